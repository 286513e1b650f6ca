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
