"""`nemo_basic.compat.neva_class`: NeVA's config builds our module class for one call only, and a
NeMo whose configure_model no longer goes through the module-level name fails by name."""
from __future__ import annotations

import types

import pytest


def test_builds_swaps_the_class_for_one_call_only():
    from nemo.collections.vlm.neva.model import base

    from nemo_basic.compat import neva_class

    original = base.MCoreNevaModel

    class Mine(original):
        pass

    with neva_class.builds(Mine):
        assert base.MCoreNevaModel is Mine
    assert base.MCoreNevaModel is original
    with pytest.raises(ValueError), neva_class.builds(Mine):
        raise ValueError("the build failed")
    assert base.MCoreNevaModel is original  # restored on failure too


def test_an_upstream_without_the_name_is_refused():
    from nemo_basic.compat import neva_class

    class NevaConfig:
        def configure_model(self, tokenizer):
            return object()  # builds something else, not through the module-level name

    fake = types.SimpleNamespace(__name__="fake_neva_base", NevaConfig=NevaConfig, MCoreNevaModel=object)
    with pytest.raises(RuntimeError, match=r"nemo_basic\.compat\.neva_class: fake_neva_base\.NevaConfig"
                                           r"\.configure_model no longer builds its model through the "
                                           r"module-level name MCoreNevaModel"):
        with neva_class.builds(type("X", (), {}), fake):
            pass


def test_the_recipe_model_is_ours_and_neva_stays_neva():
    """Built through NeMo's configure_model: BasicNevaConfig gives BasicMCoreNevaModel, and a plain
    NevaConfig in the same process still gives NeVA's class."""
    from nemo_workers import configure_classes

    from nemo_basic.testing import run_distributed

    assert run_distributed(configure_classes, 1)[0] == ["BasicMCoreNevaModel", "MCoreNevaModel"]
