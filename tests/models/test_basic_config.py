"""BasicConfig and BasicNevaConfig reject bad settings with a message naming the key."""
import pytest

from nemo_basic.models.basic_config import BasicConfig, BasicConfigError


@pytest.mark.parametrize("kwargs,key", [
    (dict(layers=0), "basic.layers"), (dict(layers=2.5), "basic.layers"),
    (dict(weighting="linear"), "basic.weighting"), (dict(degree="uniform"), "basic.degree"),
    (dict(lambda_das=-1.0), "basic.lambda_das"), (dict(lambda_sds=float("nan")), "basic.lambda_sds"),
    (dict(kl_chunk_size=0), "basic.kl_chunk_size"), (dict(das="yes"), "basic.das"),
])
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(BasicConfigError, match=key.replace(".", r"\.")):
        BasicConfig(**kwargs)


def test_one_declaration_for_plain_python_and_the_recipe():
    """The recipe's basic: section is BasicConfig itself: same allowed values, same message."""
    import os

    from nemo_basic.models.basic_config import DEGREES, WEIGHTINGS
    from nemo_basic.recipes.schema import RecipeConfigError, load_config

    assert WEIGHTINGS == ("inc", "const", "dec") and DEGREES == ("attention", "equal")
    conf = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "tiny.yaml")
    assert isinstance(load_config(conf, ["basic.weighting=dec"]).basic, BasicConfig)
    with pytest.raises(BasicConfigError) as plain:
        BasicConfig(weighting="linear")
    with pytest.raises(RecipeConfigError) as recipe:
        load_config(conf, ["basic.weighting=linear"])
    assert str(plain.value) == str(recipe.value) == \
        "basic.weighting = 'linear' is invalid: expected one of inc | const | dec"


def test_layers_checked_against_the_model():
    assert BasicConfig().num_supervision_layers(32) == 16   # 7B: k = L // 2
    assert BasicConfig().num_supervision_layers(40) == 20   # 13B
    assert BasicConfig(layers=4).num_supervision_layers(4) == 4
    with pytest.raises(BasicConfigError, match=r"basic\.layers = 5 .*1\.\.4"):
        BasicConfig(layers=5).num_supervision_layers(4)


def test_active_only_with_a_weighted_loss():
    assert BasicConfig().active
    assert not BasicConfig(enabled=False).active
    assert not BasicConfig(das=False, sds=False).active
    assert not BasicConfig(lambda_das=0.0, sds=False).active


def test_neva_config_rejects_unsupported_combinations():
    from nemo_basic.models.neva import BasicNevaConfig, stage_of_layer
    from nemo_basic.testing import tiny_neva

    spanning = tiny_neva.tiny_neva_config(BasicNevaConfig, basic=BasicConfig(layers=3), pipeline_model_parallel_size=2)
    assert spanning.validate_basic() == 3  # carried between stages
    spanning.sequence_parallel = True
    with pytest.raises(BasicConfigError, match=r"basic\.layers = 3 spans pipeline stages.*sequence_parallel"):
        spanning.validate_basic()

    per_token = tiny_neva.tiny_neva_config(BasicNevaConfig, basic=BasicConfig(layers=2))
    per_token.language_transformer_config.calculate_per_token_loss = True
    with pytest.raises(BasicConfigError, match=r"calculate_per_token_loss = True is not supported"):
        per_token.validate_basic()
    per_token.basic = BasicConfig(enabled=False)  # plain NeVA: Megatron's own per-token mode applies
    assert per_token.validate_basic() == 2


def test_stage_of_layer_follows_megatrons_split():
    from types import SimpleNamespace

    from nemo_basic.models.neva import stage_of_layer

    even = SimpleNamespace(num_layers=40, num_layers_in_first_pipeline_stage=None,
                           num_layers_in_last_pipeline_stage=None)
    assert [stage_of_layer(even, 4, l) for l in (1, 10, 11, 20, 21, 40)] == [0, 0, 1, 1, 2, 3]
    uneven = SimpleNamespace(num_layers=40, num_layers_in_first_pipeline_stage=4,
                             num_layers_in_last_pipeline_stage=None)
    assert [stage_of_layer(uneven, 4, l) for l in (4, 5, 16, 17, 28, 29)] == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("where,key,value,message", [
    ("top", "context_parallel_size", 2, r"context_parallel_size = 2 is not supported with BASIC"),
    ("top", "virtual_pipeline_model_parallel_size", 2, r"virtual_pipeline_model_parallel_size = 2 .*interleaved"),
    ("top", "fp8_dot_product_attention", True, r"fp8_dot_product_attention = True is not supported"),
    ("lm", "fp8_multi_head_attention", True, r"fp8_multi_head_attention = True is not supported"),
    ("lm", "window_size", (16, 0), r"window_size = \(16, 0\) .*sliding-window"),
    ("lm", "softmax_type", "off-by-one", r"softmax_type = 'off-by-one' is not supported"),
])
def test_neva_config_rejects_layouts_basic_cannot_supervise(where, key, value, message):
    from nemo_basic.models.neva import BasicNevaConfig
    from nemo_basic.testing import tiny_neva

    config = tiny_neva.tiny_neva_config(BasicNevaConfig, basic=BasicConfig(layers=2))
    setattr(config if where == "top" else config.language_transformer_config, key, value)
    with pytest.raises(BasicConfigError, match=message):
        config.validate_basic()
    config.basic = BasicConfig(enabled=False)  # plain NeVA is not BASIC's to refuse
    assert config.validate_basic() == 2


def test_window_at_least_the_sequence_length_is_accepted():
    from nemo_basic.models.neva import BasicNevaConfig
    from nemo_basic.testing import tiny_neva

    config = tiny_neva.tiny_neva_config(BasicNevaConfig, basic=BasicConfig(layers=2))
    config.language_transformer_config.window_size = (tiny_neva.SEQ, 0)  # never binds: full causal
    assert config.validate_basic() == 2


def test_mixed_precision_reaches_the_language_config():
    """NeMo's precision plugin sets bf16 / FP8 on the top-level config only; the decoder reads
    them from the language config (TransformerBlock builds its FP8 context from it)."""
    import torch

    from nemo_basic.models.neva import BasicNevaConfig
    from nemo_basic.testing import tiny_neva

    config = tiny_neva.tiny_neva_config(BasicNevaConfig, basic=BasicConfig(layers=2))
    plugin = dict(bf16=True, params_dtype=torch.bfloat16, fp8="hybrid", fp8_recipe="delayed", fp8_margin=1,
                  fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_wgrad=True, fp8_param=False)
    for key, value in plugin.items():  # what MegatronMixedPrecision.convert_config does
        setattr(config, key, value)
    config.propagate_precision()
    lm = config.language_transformer_config
    for key, value in plugin.items():
        assert getattr(lm, key) == value, key
    for sub in (config.vision_transformer_config, config.vision_projection_config):
        assert sub.bf16 and sub.params_dtype == torch.bfloat16
        assert sub.fp8 is None  # FP8 stays out of the frozen vision tower
    # fp32 at the top never overrides what a sub-config chose
    config = tiny_neva.tiny_neva_config(BasicNevaConfig, basic=BasicConfig(layers=2))
    config.language_transformer_config.bf16 = True
    config.propagate_precision()
    assert config.language_transformer_config.bf16 and config.language_transformer_config.fp8 is None
