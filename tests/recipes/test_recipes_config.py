"""Recipe configuration: every YAML in conf/ loads and validates; bad overrides are reported by key."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest

from nemo_basic.recipes import model as M
from nemo_basic.recipes.schema import RecipeConfigError, load_config, resolve_runtime

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFS = sorted(glob.glob(os.path.join(REPO, "conf", "*.yaml")))
BIG_7B = os.path.join(REPO, "conf", "llava15_7b_stage1.yaml")


def stages_of(path: str) -> list:
    name = os.path.basename(path)
    if "stage1" in name:
        return [1]
    if "stage2" in name:
        return [2]
    return [1, 2]  # tiny.yaml: both entry points


def runtime_for(cfg):
    gpu = cfg.trainer.accelerator == "gpu"  # check a GPU config for the GPUs it is written for
    return resolve_runtime(cfg, cuda=gpu, gpus_per_node=8 if gpu else 0)


def test_conf_has_the_paper_recipes():
    names = {os.path.basename(p) for p in CONFS}
    for stem in ("llava15_7b", "llava15_13b", "clip_gemma2b", "clip_phi3mini", "clip_mistral7b",
                 "siglip_vicuna7b", "siglip_vicuna13b", "embedded"):
        assert {f"{stem}_stage1.yaml", f"{stem}_stage2.yaml"} <= names, stem
    assert {"tiny.yaml", "llava15_7b_stage2_fp8.yaml"} <= names


@pytest.mark.parametrize("path", CONFS, ids=[os.path.basename(p) for p in CONFS])
def test_every_config_loads_and_validates(path):
    for stage in stages_of(path):
        cfg = load_config(path, stage=stage)
        assert cfg.run.stage == stage
        runtime = runtime_for(cfg)
        arch = M.check_model(cfg)
        assert arch.k == (cfg.basic.layers or arch.num_layers // 2)
        assert arch.img_seq_len < cfg.model.seq_length
        if cfg.model.type == "hf":  # the paper's schedule and BASIC weights
            assert cfg.optim.lr == (1e-3 if stage == 1 else 2e-5)
            assert cfg.optim.warmup_ratio == 0.03 and cfg.basic.lambda_das == 1.0 and cfg.basic.lambda_sds == 0.01
            assert cfg.freeze_language_model == (stage == 1) and cfg.model.freeze_vision_model
            assert cfg.template == ("plain" if stage == 1 else "vicuna_v1")
        if cfg.trainer.accelerator == "gpu":
            assert runtime.precision == "bf16-mixed" and runtime.distributed_optimizer
            assert cfg.data.global_batch_size == (256 if stage == 1 else 128)
            assert cfg.trainer.max_steps is None and cfg.trainer.epochs == 1
            # a 2-node version of every GPU recipe still divides the batch
            cfg.trainer.num_nodes = 2
            runtime_for(cfg)


@pytest.mark.parametrize("name,stage,k,layers,tp,img", [
    ("llava15_7b_stage1.yaml", 1, 16, 32, 1, 576), ("llava15_7b_stage2.yaml", 2, 16, 32, 2, 576),
    ("llava15_13b_stage1.yaml", 1, 20, 40, 1, 576), ("llava15_13b_stage2.yaml", 2, 20, 40, 4, 576),
    ("clip_gemma2b_stage1.yaml", 1, 9, 18, 1, 576), ("clip_phi3mini_stage2.yaml", 2, 16, 32, 1, 576),
    ("clip_mistral7b_stage2.yaml", 2, 16, 32, 2, 576), ("siglip_vicuna7b_stage1.yaml", 1, 16, 32, 1, 729),
    ("siglip_vicuna13b_stage2.yaml", 2, 20, 40, 4, 729), ("embedded_stage1.yaml", 1, 15, 30, 1, 64),
])
def test_paper_settings(name, stage, k, layers, tp, img):
    cfg = load_config(os.path.join(REPO, "conf", name), stage=stage)
    arch = M.check_model(cfg)
    assert (arch.k, arch.num_layers, cfg.parallel.tensor, arch.img_seq_len) == (k, layers, tp, img)
    runtime = runtime_for(cfg)
    if cfg.trainer.accelerator == "gpu":
        assert runtime.world_size == 8 and runtime.data_parallel == 8 // tp


def test_fp8_switch():
    cfg = load_config(os.path.join(REPO, "conf", "llava15_7b_stage2_fp8.yaml"), stage=2)
    assert cfg.trainer.fp8 == "hybrid" and cfg.parallel.distributed_optimizer
    assert runtime_for(cfg).precision == "bf16-mixed"
    assert load_config(BIG_7B, ["trainer.fp8=hybrid"], stage=1).trainer.fp8 == "hybrid"
    cfg = load_config(os.path.join(REPO, "conf", "tiny.yaml"), ["trainer.fp8=hybrid"], stage=1)
    with pytest.raises(RecipeConfigError, match=r"trainer\.fp8 = 'hybrid' is invalid.*Transformer Engine"):
        resolve_runtime(cfg, cuda=False)


def test_ablation_switches():
    base = ["model.type=tiny", "data.path=synthetic", "trainer.max_steps=2"]
    cfg = load_config(BIG_7B, ["basic.das=false"])
    assert cfg.basic.das is False and cfg.basic.sds is True and cfg.basic.active
    assert M.check_model(load_config(BIG_7B, ["basic.layers=8"])).k == 8
    assert load_config(BIG_7B, ["basic.weighting=const"]).basic.weighting == "const"
    assert load_config(BIG_7B, ["basic.degree=equal"]).basic.degree == "equal"
    off = load_config(BIG_7B, ["basic.enabled=false"])
    assert not off.basic.active and M.check_model(off).k == 0
    both_off = load_config(None, base + ["basic.das=false", "basic.sds=false"])
    assert not both_off.basic.active  # exactly LLaVA


@pytest.mark.parametrize("override,message", [
    ("trainer.max_stepz=2", "unknown key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)"),
    ("trainr.max_steps=2", "unknown key 'trainr' (did you mean 'trainer'?)"),
    ("optim.max_steps=2", "unknown key 'optim.max_steps' (did you mean 'trainer.max_steps'?)"),
    ("basic.lamda_sds=0.1", "unknown key 'basic.lamda_sds' (did you mean 'basic.lambda_sds'?)"),
    ("trainer.max_steps=abc", "trainer.max_steps = 'abc' is invalid: expected null (epochs over the data) or an "
                              "integer >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps = 0 is invalid: expected null (epochs over the data) or an integer >= 1"),
    ("optim.lr=-1", "optim.lr = -1.0 is invalid: expected a number > 0"),
    ("trainer.precision=bf17", "trainer.precision = 'bf17' is invalid: expected one of auto | 32 | bf16-mixed | "
                               "16-mixed"),
    ("basic.weighting=quadratic", "basic.weighting = 'quadratic' is invalid: expected one of inc | const | dec"),
    ("basic.degree=uniform", "basic.degree = 'uniform' is invalid: expected one of attention | equal"),
    ("basic.das=maybe", "basic.das = 'maybe' is invalid: expected true or false"),
    ("basic.lambda_sds=-0.5", "basic.lambda_sds = -0.5 is invalid: expected a number >= 0"),
    ("data.template=chatml", "data.template = 'chatml' is invalid: expected one of null | plain | vicuna_v1"),
    ("data.global_batch_size=100", "data.global_batch_size = 100 is invalid: expected a multiple of "
                                   "data.micro_batch_size (16)"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(RecipeConfigError) as e:
        load_config(BIG_7B, [override], stage=1)
    assert message in str(e.value)


@pytest.mark.parametrize("override,message", [
    ("basic.layers=40", "basic.layers = 40 is invalid: expected null (num_layers // 2) or an integer in 1..32"),
    ("parallel.tensor=3", "parallel.tensor = 3 is invalid: expected a size dividing the 32 attention heads"),
    ("parallel.pipeline=4 parallel.tensor=2 parallel.sequence_parallel=true",
     "parallel.sequence_parallel = True is invalid: expected false (basic.layers = 16 spans pipeline stages (the "
     "first holds 8 layers)"),
    ("model.seq_length=500", "model.seq_length = 500 is invalid: expected an integer > 576"),
    ("model.vision_feature_layer=0", "model.vision_feature_layer = 0 is invalid: expected an index into the 24 "
                                     "vision layers (-1: last, -2: second to last)"),
    ("model.vision_feature_layer=-25", "model.vision_feature_layer = -25 is invalid: expected an index into the 24"),
    ("model.vision_arch=clip-vit-huge", "model.vision_arch = 'clip-vit-huge' is invalid: expected one of"),
])
def test_model_dependent_errors_name_the_key(override, message):
    cfg = load_config(BIG_7B, override.split(), stage=1)
    with pytest.raises(RecipeConfigError) as e:
        M.check_model(cfg)
    assert message in str(e.value)


@pytest.mark.parametrize("stage,pipeline,spans", [(1, 2, False), (1, 4, True), (2, 2, False), (2, 4, True)])
def test_13b_checks_with_pipeline_parallelism(stage, pipeline, spans):
    """Layers 1..k (k = 20 of 40) may span pipeline stages: `--check` accepts the 13B recipes at PP=2
    (layers 1..20 on the first stage) and PP=4 (spanning), as on their GPUs."""
    from nemo_basic.recipes.train import ddp_settings, preflight

    path = os.path.join(REPO, "conf", f"llava15_13b_stage{stage}.yaml")
    extra = ["parallel.sequence_parallel=false", "trainer.num_nodes=2"] if stage == 2 else []
    cfg = load_config(path, [f"parallel.pipeline={pipeline}", *extra], stage=stage)
    runtime = preflight(cfg, require_files=False, assume_target=True)
    assert runtime.arch.k == 20 and runtime.arch.spans_stages is spans
    assert not runtime.blockers
    # the distributed optimizer's overlapped all-gather would hand the stage completing L_sds last
    # step's E when the LLM trains (stage 2) and k spans stages: off only there
    assert ddp_settings(cfg, runtime)["overlap_param_gather"] is not (stage == 2 and spans)


@pytest.mark.parametrize("override,name", [("run.name=off", "off"), ("run.name=yes", "yes"), ("run.name=1e3", "1e3"),
                                           ("run.name='no'", "no")])
def test_text_keys_stay_text(override, name, tmp_path):
    """YAML would read off/yes/1e3 as a boolean or a number; where the schema says string they stay text."""
    cfg = load_config(BIG_7B, [override, f"run.log_dir={tmp_path}"], stage=1)
    assert cfg.run.name == name and cfg.run_dir == os.path.join(str(tmp_path), name, "stage1")
    yaml_file = tmp_path / "off.yaml"
    yaml_file.write_text(f"base: {BIG_7B}\nrun:\n  name: off\ntrainer:\n  precision: 32\n")
    cfg = load_config(str(yaml_file), ["trainer.accelerator=cpu"], stage=1)
    assert cfg.run.name == "off" and cfg.trainer.precision == "32"
    assert load_config(BIG_7B, ["trainer.precision=32"], stage=1).trainer.precision == "32"


def test_booleans_and_text_are_not_numbers(tmp_path):
    for override, message in [("trainer.max_steps=true", "trainer.max_steps = True is invalid"),
                              ("optim.lr=abc", "optim.lr = 'abc' is invalid: expected a number > 0"),
                              ("data.num_workers=1.5", "data.num_workers = 1.5 is invalid: expected an integer >= 0"),
                              ("trainer=5", "trainer = 5 is invalid: expected a section (mapping of keys)")]:
        with pytest.raises(RecipeConfigError) as e:
            load_config(BIG_7B, [override], stage=1)
        assert message in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {BIG_7B}\ntrainer:\n  max_stepz: 3\n")
    with pytest.raises(RecipeConfigError, match=r"unknown key 'trainer\.max_stepz' \(did you mean 'trainer\."
                                                r"max_steps'\?\) \[.*bad\.yaml\]"):
        load_config(str(bad), stage=1)


def test_help_config_lists_every_key():
    from nemo_basic.recipes.schema import all_keys, describe_keys

    text = describe_keys()
    assert all(f"\n{key} = " in "\n" + text for key in all_keys())
    assert "basic.weighting = 'inc': one of inc | const | dec\n    eq. 4 layer weights" in text
    assert "trainer.max_steps = None: null (epochs over the data) or an integer >= 1" in text


def test_machine_dependent_errors():
    cfg = load_config(BIG_7B, ["trainer.devices=6"], stage=1)
    with pytest.raises(RecipeConfigError, match=r"data\.global_batch_size = 256 is invalid: expected a multiple "
                                                r"of micro_batch_size x data-parallel size = 16 x 6"):
        resolve_runtime(cfg, cuda=True, gpus_per_node=8)
    with pytest.raises(RecipeConfigError, match=r"trainer\.accelerator = 'gpu' is invalid.*CUDA is not available"):
        resolve_runtime(cfg, cuda=False)
    cpu = load_config(os.path.join(REPO, "conf", "tiny.yaml"), ["trainer.precision=bf16-mixed"], stage=1)
    with pytest.raises(RecipeConfigError, match=r"trainer\.precision = 'bf16-mixed' is invalid: expected auto or 32"):
        resolve_runtime(cpu, cuda=False)


def test_stage_mismatch_and_stage2_start():
    stage2 = os.path.join(REPO, "conf", "llava15_7b_stage2.yaml")
    with pytest.raises(RecipeConfigError, match=r"run\.stage = 2 is invalid.*examples/basic_finetune\.py"):
        load_config(stage2, stage=1)
    with pytest.raises(RecipeConfigError, match=r"checkpoint\.init_from = 'x' is invalid: expected null"):
        load_config(BIG_7B, ["checkpoint.init_from=x"], stage=1)


def test_cli_reports_a_bad_key_before_heavy_work(tmp_path):
    """The example exits with status 2 and the message; no run folder, no NeMo import."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "basic_pretrain.py"),
                           "--config", os.path.join(REPO, "conf", "tiny.yaml"), f"run.log_dir={tmp_path}",
                           "trainer.max_stepz=2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: unknown key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)" in proc.stderr
    assert "nemo.collections" not in proc.stderr and list(tmp_path.iterdir()) == []
    assert time.time() - t0 < 60


def test_cli_check_reports_the_architecture():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "basic_finetune.py"),
                           "--config", os.path.join(REPO, "conf", "llava15_13b_stage2.yaml"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "LLM 40 layers, hidden 5120" in out and "BASIC k = 20" in out and "total 13.351 B" in out
    assert "precision bf16-mixed" in out and "data_parallel 2" in out and "grad_accumulation 32" in out


@pytest.mark.gpu_path
def test_fp8_primary_weights_only_when_asked():
    """trainer.fp8 gives FP8 GEMMs on bf16 weights; FP8 primary weights (NeMo's fp8_param_gather →
    fp8_param → TE's fp8_model_init), never run with NeVA, need trainer.fp8_param=true."""
    from nemo_basic.recipes import train

    from nemo_basic.recipes.schema import Runtime

    gpu = Runtime(accelerator="gpu", devices=8, precision="bf16-mixed", distributed_optimizer=True, data_parallel=8,
                  world_size=8, grad_accumulation=1)
    fp8 = os.path.join(REPO, "conf", "llava15_7b_stage2_fp8.yaml")
    plugin = train.precision_plugin(load_config(fp8, stage=2), gpu)
    assert (plugin.dtype_config.fp8, plugin.dtype_config.fp8_param_gather, plugin.dtype_config.fp8_param) == (
        "hybrid", False, False)
    plugin = train.precision_plugin(load_config(fp8, ["trainer.fp8_param=true"], stage=2), gpu)
    assert (plugin.dtype_config.fp8_param_gather, plugin.dtype_config.fp8_param) == (True, True)
    with pytest.raises(RecipeConfigError, match=r"trainer\.fp8_param = True is invalid.*trainer\.fp8 is null"):
        load_config(BIG_7B, ["trainer.fp8_param=true"], stage=1)


@pytest.mark.gpu_path
@pytest.mark.parametrize("precision, dtype", [("32", "float32"), ("bf16-mixed", "bfloat16"), ("16-mixed", "float16")])
def test_one_dtype_for_weights_optimizer_and_pipeline(precision, dtype):
    """The optimizer's params_dtype, the precision plugin's params / pipeline dtype and the model
    config's pipeline dtype all follow trainer.precision (16-mixed used to give fp32 pipeline
    buffers for fp16 activations)."""
    import torch

    from nemo_basic.recipes import train
    from nemo_basic.recipes.schema import Runtime

    want = getattr(torch, dtype)
    gpu = Runtime(accelerator="gpu", devices=8, precision=precision, distributed_optimizer=True, data_parallel=8,
                  world_size=8, grad_accumulation=1)
    cfg = load_config(os.path.join(REPO, "conf", "tiny.yaml"), stage=1)
    optim, _ = train.build_optim(cfg, gpu, max_steps=4)
    assert optim.config.params_dtype == want
    assert (optim.config.bf16, optim.config.fp16) == (dtype == "bfloat16", dtype == "float16")
    if precision != "32":
        plugin = train.precision_plugin(cfg, gpu)
        assert plugin.dtype_config.params_dtype == plugin.dtype_config.pipeline_dtype == want
    config = M.build_model_config(cfg, gpu)
    assert config.pipeline_dtype == config.language_transformer_config.pipeline_dtype == want


@pytest.mark.gpu_path
@pytest.mark.parametrize("override, key", [("trainer.fp8=hybrid", "trainer.fp8"),
                                           ("parallel.sequence_parallel=true", "parallel.sequence_parallel")])
def test_cuda_without_te_refuses_what_needs_te(override, key):
    """On a CUDA machine without Transformer Engine (here: no TE either) FP8 and sequence
    parallelism are refused by key before anything is built; bf16 on the local spec is not."""
    from nemo_basic.recipes.schema import Runtime

    gpu = Runtime(accelerator="gpu", devices=8, precision="bf16-mixed", distributed_optimizer=True, data_parallel=4,
                  world_size=8, grad_accumulation=1)
    cfg = load_config(BIG_7B, ["parallel.tensor=2", override], stage=1)
    with pytest.raises(RecipeConfigError, match=rf"{key} = .* is invalid.*Transformer Engine"):
        M.check_model(cfg, gpu)
    M.check_model(load_config(BIG_7B, ["parallel.tensor=2"], stage=1), gpu)


def test_vision_feature_layer_one_rule_for_recipe_and_builder():
    """The recipe and the model builder apply one rule (nemo_basic.models.feature_layer): HF's hidden
    states indexed as Python does, the embeddings (index 0) excluded: 1..L and -L..-1."""
    import inspect

    from nemo_basic.models import builder, feature_layer

    assert [i for i in range(-26, 27) if feature_layer.problem(i, 24) is None] == [*range(-24, 0), *range(1, 25)]
    assert feature_layer.problem(True, 24) is not None
    assert "feature_layer.problem(" in inspect.getsource(builder.basic_neva_config_from_hf)
    for ok in (-24, 24):
        M.check_model(load_config(BIG_7B, [f"model.vision_feature_layer={ok}"], stage=1))


def test_data_paths_are_checked_by_key(tmp_path):
    """Each data.path entry: an embedded split, or a folder of prepared shards, else a message naming it."""
    from nemo_basic.recipes import data as D

    shards = "prepared shard folders (scripts/prepare_llava_data.py)"
    cases = {
        "embedded://stage3": f"data.path = 'embedded://stage3' is invalid: expected embedded://stage1 | "
                             f"embedded://stage2 or {shards}",
        f"{tmp_path}/missing": f"data.path = '{tmp_path}/missing' is invalid: expected {shards} "
                               f"({tmp_path}/missing is not a folder)",
        str(tmp_path): f"data.path = '{tmp_path}' is invalid: expected {shards} ({tmp_path} has no .nv-meta/ "
                       "metadata: prepare it with scripts/prepare_llava_data.py (or `energon prepare`))",
    }
    for path, message in cases.items():
        cfg = load_config(os.path.join(REPO, "conf", "embedded_stage1.yaml"), [f"data.path=[{path}]"], stage=1)
        with pytest.raises(RecipeConfigError) as e:
            D.check_data_paths(cfg)
        assert str(e.value) == message
    ok = load_config(os.path.join(REPO, "conf", "embedded_stage1.yaml"), ["data.path=[embedded://stage2]"], stage=1)
    D.check_data_paths(ok)  # a split name is checked without generating the data
