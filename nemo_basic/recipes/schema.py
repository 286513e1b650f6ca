"""The recipe configuration: dataclasses → omegaconf structured config → validated `RecipeConfig`.

A recipe YAML (``conf/*.yaml``) is merged onto the schema below, then the command-line
``key=value`` overrides (omegaconf dotlist) are merged on top; a YAML may start from another one
with ``base: other.yaml`` (path relative to the YAML). Every problem is reported as a
`RecipeConfigError` naming the key *before* anything heavy is imported or built:

* unknown key      → ``unknown key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)``
* wrong type       → ``trainer.max_steps = 'abc' is invalid: expected null or an integer >= 1``
* bad choice/range → ``trainer.precision = 'bf17' is invalid: expected one of auto | 32 | bf16-mixed``

Checks that need the model's shape (``basic.layers`` ≤ number of layers, heads divisible by the
tensor-parallel size, …) run in `nemo_basic.recipes.model.check_model` from the architecture
alone (the checkpoint's ``config.json`` or a named preset), still without building anything.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

from nemo_basic.models.basic_config import BasicConfig, BasicConfigError

STAGES = (1, 2)
MODEL_TYPES = ("hf", "tiny")
PROJECTORS = ("mlp2x_gelu", "linear")
TEMPLATES = ("plain", "vicuna_v1")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
FP8_MODES = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise")
IMAGE_MODES = ("pad", "crop")
EMBEDDED_SCHEME = "embedded://"


class RecipeConfigError(ValueError):
    """A recipe setting is invalid; the message names the key (``trainer.max_steps``)."""


# -- field metadata: the allowed values of each key, checked after merging ---------------------------
def _meta(allowed: str, check: Callable[[Any], bool]) -> dict:
    return {"allowed": allowed, "check": check}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def choice(*values, nullable: bool = False) -> dict:
    allowed = " | ".join(str(v) for v in values)
    if nullable:
        allowed = "null | " + allowed
    return _meta(f"one of {allowed}", lambda v: (v is None and nullable) or v in values)


def int_range(lo: Optional[int] = None, hi: Optional[int] = None, nullable: bool = False, what: str = "") -> dict:
    if lo is not None and hi is not None:
        text = f"an integer in {lo}..{hi}"
    elif lo is not None:
        text = f"an integer >= {lo}"
    elif hi is not None:
        text = f"an integer <= {hi}"
    else:
        text = "an integer"
    if nullable:
        text = f"null{what} or {text}"
    return _meta(text, lambda v: (v is None and nullable) or (
        _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)))


def num_range(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
              nullable: bool = False) -> dict:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    text = "a number" + (" " + " and ".join(parts) if parts else "")
    if nullable:
        text = "null or " + text

    def check(v):
        if v is None:
            return nullable
        if not _is_num(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or v <= hi

    return _meta(text, check)


def boolean() -> dict:
    return _meta("true or false", lambda v: isinstance(v, bool))


def opt_bool(what: str) -> dict:
    return _meta(f"null ({what}), true or false", lambda v: v is None or isinstance(v, bool))


def text(nullable: bool = False, what: str = "a string") -> dict:
    return _meta(("null or " if nullable else "") + what,
                 lambda v: (v is None and nullable) or (isinstance(v, str) and v != ""))


def F(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, doc: str = "", **meta):
    """A dataclass field carrying its allowed values (``meta``) and a one-line description."""
    md = dict(meta)
    md["doc"] = doc
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


# -- the schema -------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    name: Optional[str] = F(None, doc="run name (null: the config file's name without _stage1/_stage2); the "
                                      "run folder is <log_dir>/<name>/stage<stage>", **text(nullable=True))
    stage: Optional[int] = F(None, doc="1: alignment (projector only), 2: instruction tuning (projector + LLM); "
                                       "null: set by the entry point (basic_pretrain.py: 1, basic_finetune.py: 2)",
                             **choice(*STAGES, nullable=True))
    log_dir: str = F("runs", doc="root folder of the runs (relative paths: to the working directory)", **text())
    seed: int = F(1234, doc="seed of the model initialisation and the data order", **int_range(0))


@dataclass
class ModelConfig:
    type: str = F("hf", doc="hf: Hugging Face LLM + vision tower; tiny: tiny random NeVA (tests)",
                  **choice(*MODEL_TYPES))
    llm_path: Optional[str] = F(None, doc="HF checkpoint folder of the LLM (or embedded://smollm2-135m)",
                                **text(nullable=True))
    vision_path: Optional[str] = F(None, doc="HF checkpoint folder of the vision tower (or embedded://dinov2-small)",
                                   **text(nullable=True))
    llm_arch: Optional[str] = F(None, doc="preset architecture used for checks while llm_path is a placeholder",
                                **text(nullable=True))
    vision_arch: Optional[str] = F(None, doc="preset architecture of the vision tower (checks without files)",
                                   **text(nullable=True))
    vision_feature_layer: int = F(-2, doc="hidden state of the vision tower fed to the projector (-1: last)",
                                  **int_range())
    drop_vision_class_token: bool = F(True, doc="drop the class token (LLaVA-1.5: 576 patches at 336 px)",
                                      **boolean())
    train_first_token_after_image: bool = F(
        True, doc="train the prediction of the first token after each image, as LLaVA does (false: NeVA's "
                  "loss mask, which never trains it)", **boolean())
    projector: str = F("mlp2x_gelu", doc="vision projector", **choice(*PROJECTORS))
    image_size: Optional[int] = F(None, doc="input side of the vision tower in pixels (null: the tower's own)",
                                  **int_range(1, nullable=True, what=" (the tower's own)"))
    seq_length: int = F(2048, doc="LLM sequence length (text + image embeddings)", **int_range(2))
    freeze_language_model: Optional[bool] = F(None, **opt_bool("stage default: frozen in stage 1, trained in 2"),
                                              doc="freeze the LLM")
    freeze_vision_model: bool = F(True, doc="freeze the vision tower (BASIC and LLaVA-1.5 keep it frozen)",
                                  **boolean())
    freeze_projector: bool = F(False, doc="freeze the projector", **boolean())
    tiny_num_layers: int = F(4, doc="decoder layers of the tiny model (type: tiny)", **int_range(1))


@dataclass
class DataConfig:
    path: List[str] = F(factory=lambda: [EMBEDDED_SCHEME + "stage1"],
                        doc="prepared shard folders (scripts/prepare_llava_data.py), embedded://stage1|stage2, "
                            "or synthetic (type: tiny)",
                        **_meta("a non-empty list of paths", lambda v: isinstance(v, list) and len(v) > 0
                                and all(isinstance(p, str) and p for p in v)))
    template: Optional[str] = F(None, doc="prompt template (null: plain in stage 1, vicuna_v1 in stage 2)",
                                **choice(*TEMPLATES, nullable=True))
    micro_batch_size: int = F(4, doc="samples per forward pass per data-parallel rank", **int_range(1))
    global_batch_size: int = F(256, doc="samples per optimizer step (all ranks, all micro-batches)",
                               **int_range(1))
    num_workers: int = F(2, doc="data-loader worker processes per rank", **int_range(0))
    image_process_mode: str = F("pad", doc="pad (LLaVA-1.5: pad to square) or crop", **choice(*IMAGE_MODES))
    pad_to_seq_length: Optional[bool] = F(None, doc="pad batches to seq_length (null: only under pipeline "
                                                    "parallelism)", **opt_bool("auto"))
    shuffle: bool = F(True, doc="seeded shuffle per epoch", **boolean())
    max_bad_sample_share: float = F(0.001, doc="corrupt samples are skipped and reported; the run stops past "
                                               "this share of the records (per data-loader process)",
                                    **num_range(0, 1))
    embedded_num_synthetic: int = F(400, doc="synthetic scenes of the embedded data set", **int_range(1))


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = F(None, doc="optimizer steps (null: `epochs` passes over the data)",
                                 **int_range(1, nullable=True, what=" (epochs over the data)"))
    epochs: float = F(1.0, doc="passes over the data when max_steps is null", **num_range(0, lo_open=True))
    stop_after_steps: Optional[int] = F(None, doc="stop with a checkpoint after this many steps in this job "
                                                  "(Slurm job chains; the next launch resumes)",
                                        **int_range(1, nullable=True))
    accelerator: str = F("auto", doc="auto: gpu when CUDA is available, else cpu", **choice(*ACCELERATORS))
    devices: Optional[int] = F(None, doc="processes per node (null: all GPUs, or 1 on CPU)",
                               **int_range(1, nullable=True, what=" (all GPUs / 1 CPU process)"))
    num_nodes: int = F(1, doc="nodes", **int_range(1))
    precision: str = F("auto", doc="auto: bf16-mixed on GPU, 32 on CPU", **choice(*PRECISIONS))
    fp8: Optional[str] = F(None, doc="FP8 with Transformer Engine (H100): null | hybrid | e4m3",
                           **choice(*FP8_MODES, nullable=True))
    fp8_recipe: str = F("delayed", doc="FP8 scaling recipe", **choice(*FP8_RECIPES))
    fp8_param: bool = F(False, doc="FP8 primary weights (TE's fp8_model_init; the distributed optimizer then "
                        "gathers FP8): off keeps bf16 weights with FP8 GEMMs. Never run with NeVA, nor a bf16 "
                        "stage-1 checkpoint restored into FP8 weights", **boolean())
    log_every_n_steps: int = F(1, doc="logging interval (TensorBoard, console, metrics.jsonl)", **int_range(1))
    progress_bar: bool = F(True, doc="console progress bar", **boolean())


@dataclass
class ParallelConfig:
    tensor: int = F(1, doc="tensor-parallel size", **int_range(1))
    pipeline: int = F(1, doc="pipeline-parallel size", **int_range(1))
    sequence_parallel: bool = F(False, doc="sequence parallelism (needs tensor > 1 and Transformer Engine)",
                                **boolean())
    distributed_optimizer: Optional[bool] = F(None, doc="shard optimizer state over data-parallel ranks "
                                                        "(null: on GPU yes, on CPU no)", **opt_bool("auto"))
    num_layers_in_first_pipeline_stage: Optional[int] = F(
        None, doc="uneven pipeline split (BASIC needs layers 1..k on the first stage)",
        **int_range(1, nullable=True, what=" (even split)"))
    overlap_grad_reduce: bool = F(True, doc="overlap the data-parallel gradient reduce (GPU)", **boolean())
    overlap_param_gather: bool = F(True, doc="overlap the parameter all-gather (GPU, distributed optimizer)",
                                   **boolean())


@dataclass
class OptimConfig:
    lr: float = F(1e-3, doc="peak learning rate", **num_range(0, lo_open=True))
    min_lr: float = F(0.0, doc="learning rate at the end of the cosine", **num_range(0))
    warmup_ratio: float = F(0.03, doc="share of the steps spent warming up (linear)", **num_range(0, 1))
    warmup_steps: Optional[int] = F(None, doc="warm-up steps (overrides warmup_ratio)",
                                    **int_range(0, nullable=True, what=" (warmup_ratio)"))
    weight_decay: float = F(0.0, doc="AdamW decoupled weight decay", **num_range(0))
    adam_beta1: float = F(0.9, **num_range(0, 1), doc="AdamW beta1")
    adam_beta2: float = F(0.999, **num_range(0, 1), doc="AdamW beta2")
    adam_eps: float = F(1e-8, **num_range(0, lo_open=True), doc="AdamW epsilon")
    clip_grad: float = F(1.0, doc="gradient-norm clipping (0: off)", **num_range(0))


@dataclass
class CheckpointConfig:
    every_n_steps: Optional[int] = F(None, doc="save every N steps (null: only at the end)",
                                     **int_range(1, nullable=True, what=" (only at the end)"))
    keep: int = F(2, doc="checkpoints kept besides the last one", **int_range(1))
    resume: bool = F(True, doc="resume from the last checkpoint of this run if there is one", **boolean())
    init_from: Optional[str] = F(None, doc="stage 2: the stage-1 run folder or checkpoint to start from (weights "
                                            "only); auto: <log_dir>/<name>/stage1; null: the pretrained LLM and "
                                            "a fresh projector", **text(nullable=True))
    async_save: bool = F(False, doc="asynchronous checkpoint saving (GPU)", **boolean())


# -- analysis (issue 12): the alignment monitor during training (nemo_basic.analysis.callback) --
@dataclass
class AnalysisConfig:
    every_n_steps: Optional[int] = F(None, doc="log the layer-0 lens metrics of a fixed probe set of scenes every N "
                                               "steps (and at the last step); null: off",
                                     **int_range(1, nullable=True, what=" (off)"))
    scenes: int = F(8, doc="synthetic scenes in the probe set (fixed for the run)", **int_range(1))
    seed: int = F(0, doc="seed of the probe scenes (a stream the training data never uses)", **int_range(0))
    pictures: bool = F(True, doc="also write the lens picture of the first scene at each analysis step",
                       **boolean())
# -- end analysis --


@dataclass
class RecipeConfig:
    base: Optional[str] = F(None, doc="YAML this one starts from (resolved when loading)", **text(nullable=True))
    run: RunConfig = F(factory=RunConfig)
    model: ModelConfig = F(factory=ModelConfig)
    basic: BasicConfig = F(factory=BasicConfig)
    data: DataConfig = F(factory=DataConfig)
    trainer: TrainerConfig = F(factory=TrainerConfig)
    parallel: ParallelConfig = F(factory=ParallelConfig)
    optim: OptimConfig = F(factory=OptimConfig)
    checkpoint: CheckpointConfig = F(factory=CheckpointConfig)
    analysis: AnalysisConfig = F(factory=AnalysisConfig)  # issue 12

    # -- derived settings ---------------------------------------------------------------------------
    @property
    def freeze_language_model(self) -> bool:
        if self.model.freeze_language_model is not None:
            return self.model.freeze_language_model
        return self.run.stage == 1

    @property
    def template(self) -> str:
        return self.data.template or ("plain" if self.run.stage == 1 else "vicuna_v1")

    @property
    def run_root(self) -> str:
        """<log_dir>/<name>: the folder of both stages of a run."""
        return os.path.join(os.path.abspath(os.path.expanduser(self.run.log_dir)), self.run.name or "basic")

    @property
    def run_dir(self) -> str:
        """<log_dir>/<name>/stage<stage>: checkpoints/, tb_logs/, metrics.jsonl, summary.json."""
        return os.path.join(self.run_root, f"stage{self.run.stage}")



# BasicConfig (nemo_basic.models.basic_config) validates itself; its allowed values for the messages:
_BASIC_ALLOWED = {
    "enabled": "true or false", "das": "true or false", "sds": "true or false",
    "layers": "null (num_layers // 2) or an integer >= 1", "weighting": "one of inc | const | dec",
    "degree": "one of attention | equal", "lambda_das": "a number >= 0", "lambda_sds": "a number >= 0",
    "kl_chunk_size": "null or an integer >= 1",
}


# -- loading --------------------------------------------------------------------------------------
def _schema():
    from omegaconf import OmegaConf

    return OmegaConf.structured(RecipeConfig)


def _section_fields(obj_type) -> dict:
    return {f.name: f for f in dataclasses.fields(obj_type)}


def _field_for(key: str):
    """(dataclass field, owning dataclass) for a dotted key, or (None, None)."""
    parts = key.split(".")
    cls = RecipeConfig
    f = None
    for i, part in enumerate(parts):
        fields = _section_fields(cls)
        if part not in fields:
            return None, None
        f = fields[part]
        if i < len(parts) - 1:
            cls = f.type if isinstance(f.type, type) else _resolve_type(cls, part)
            if cls is None:
                return None, None
    return f, cls


def _resolve_type(owner, name):
    import typing

    hints = typing.get_type_hints(owner)
    t = hints.get(name)
    return t if dataclasses.is_dataclass(t) else None


def _all_keys(cls=RecipeConfig, prefix: str = "") -> List[str]:
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        full = prefix + f.name
        if dataclasses.is_dataclass(t):
            keys.extend(_all_keys(t, full + "."))
        else:
            keys.append(full)
    return keys


def all_keys() -> List[str]:
    """Every leaf key of the schema (``trainer.max_steps``, …)."""
    return _all_keys()


def allowed_values(key: str) -> str:
    section = key.split(".")[0]
    if section == "basic":
        return _BASIC_ALLOWED.get(key.split(".", 1)[1], "see nemo_basic/models/basic_config.py")
    import typing

    f, owner = _field_for(key)
    if f is None:
        return "?"
    if "allowed" in f.metadata:
        return f.metadata["allowed"]
    return str(typing.get_type_hints(owner).get(f.name))


def _did_you_mean(key: str) -> str:
    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    match = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]  # a right name in the wrong section
    if not match:
        sections = sorted({k.split(".")[0] for k in keys})
        match = difflib.get_close_matches(key, keys + sections, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown_key_error(key: str) -> RecipeConfigError:
    return RecipeConfigError(f"unknown key '{key}'{_did_you_mean(key)}")


def bad_value(key: str, value: Any, allowed: Optional[str] = None, why: str = "") -> RecipeConfigError:
    allowed = allowed or allowed_values(key)
    extra = f" ({why})" if why else ""
    return RecipeConfigError(f"{key} = {value!r} is invalid: expected {allowed}{extra}")


def _translate(err, source: str) -> RecipeConfigError:
    """An omegaconf error → a RecipeConfigError naming the key."""
    from omegaconf import errors

    key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
    where = f" [{source}]" if source else ""
    if isinstance(err, errors.ConfigKeyError) or "not in '" in str(getattr(err, "msg", "")):
        e = unknown_key_error(str(key))
        return RecipeConfigError(str(e) + where)
    value = None
    msg = str(getattr(err, "msg", err))
    if msg.startswith("Value '"):
        value = msg[len("Value '"):].split("'", 1)[0]
    elif "Merge error" in msg and "value:" in msg:
        value = msg.rsplit("value:", 1)[1].strip()
    if not key:
        return RecipeConfigError(f"invalid configuration{where}: {msg.splitlines()[0]}")
    return RecipeConfigError(str(bad_value(str(key), value if value is not None else "?")) + where)


def _check_top_keys(raw: dict, source: str) -> None:
    """Unknown keys anywhere in a plain dict (before omegaconf sees it), for a clear message."""
    import typing

    def walk(d, cls, prefix):
        hints = typing.get_type_hints(cls)
        for k, v in d.items():
            full = prefix + str(k)
            if k not in hints:
                raise RecipeConfigError(str(unknown_key_error(full)) + (f" [{source}]" if source else ""))
            if dataclasses.is_dataclass(hints[k]):
                if isinstance(v, dict):
                    walk(v, hints[k], full + ".")
                elif v is not None:
                    raise RecipeConfigError(f"{full} = {v!r} is invalid: expected a section (mapping of keys)"
                                            + (f" [{source}]" if source else ""))

    walk(raw, RecipeConfig, "")


def _normalise(raw: dict) -> dict:
    """Accept a single path for ``data.path``."""
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        data["path"] = [data["path"]]
    return raw


def _read_yaml(path: str, seen: Sequence[str] = ()) -> List[tuple[str, dict]]:
    """[(source, dict)] of ``path`` and the YAMLs it starts from (``base:``), base first."""
    from omegaconf import OmegaConf

    path = os.path.abspath(path)
    if path in seen:
        raise RecipeConfigError(f"base: cycle through {path}")
    if not os.path.isfile(path):
        raise RecipeConfigError(f"config file {path} does not exist")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax
        raise RecipeConfigError(f"{path}: not valid YAML: {e}") from None
    raw = OmegaConf.to_container(node, resolve=False) or {}
    if not isinstance(raw, dict):
        raise RecipeConfigError(f"{path}: expected a mapping at the top level")
    chain = []
    base = raw.get("base")
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        chain.extend(_read_yaml(base_path, (*seen, path)))
    raw["base"] = None
    chain.append((path, _normalise(raw)))
    return chain


def _parse_overrides(overrides: Sequence[str]) -> dict:
    from omegaconf import OmegaConf

    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise RecipeConfigError(f"override {o!r} is not of the form key=value (e.g. trainer.max_steps=2)")
    try:
        return _normalise(OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False))
    except Exception as e:
        raise RecipeConfigError(f"cannot parse the overrides {list(overrides)}: {e}") from None


def default_run_name(path: Optional[str]) -> str:
    if not path:
        return "basic"
    stem = os.path.splitext(os.path.basename(path))[0]
    for suffix in ("_stage1", "_stage2", "-stage1", "-stage2"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), stage: Optional[int] = None) -> RecipeConfig:
    """Load ``path`` (and its ``base:`` chain), apply ``overrides`` (``["trainer.max_steps=2", ...]``)
    and validate everything that does not need the model's architecture. ``stage`` is the entry
    point's stage: a config for the other stage is an error; a config without ``run.stage`` takes it."""
    from omegaconf import OmegaConf, errors

    layers: List[tuple[str, dict]] = []
    if path:
        layers.extend(_read_yaml(path))
    if overrides:
        layers.append(("command line", _parse_overrides(overrides)))
    cfg = _schema()
    for source, raw in layers:
        _check_top_keys(raw, source if source != "command line" else "")
        try:
            cfg = OmegaConf.merge(cfg, raw)
        except errors.OmegaConfBaseException as e:
            raise _translate(e, "" if source == "command line" else source) from None
    try:
        OmegaConf.resolve(cfg)  # ${oc.env:...} and friends
    except errors.OmegaConfBaseException as e:
        raise RecipeConfigError(f"cannot resolve {getattr(e, 'full_key', '')}: {e}") from None
    for key in all_keys():  # allowed values, before building dataclasses (BasicConfig validates itself)
        if key.startswith("basic."):
            continue
        f, _ = _field_for(key)
        value = OmegaConf.select(cfg, key)
        if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
            value = list(value)
        if f is not None and "check" in f.metadata and not f.metadata["check"](value):
            raise bad_value(key, value, f.metadata["allowed"])
    try:
        obj: RecipeConfig = OmegaConf.to_object(cfg)
    except BasicConfigError as e:
        raise RecipeConfigError(str(e)) from None
    except errors.OmegaConfBaseException as e:
        raise _translate(e, "") from None
    if stage is not None:
        if obj.run.stage is not None and obj.run.stage != stage:
            script = "examples/basic_pretrain.py" if obj.run.stage == 1 else "examples/basic_finetune.py"
            raise bad_value("run.stage", obj.run.stage, f"{stage} or null for this entry point",
                            f"a stage-{obj.run.stage} config belongs to {script}")
        obj.run.stage = stage
    elif obj.run.stage is None:
        obj.run.stage = 1
    if obj.run.name is None:
        obj.run.name = default_run_name(path)
    validate(obj)
    return obj


def to_yaml(cfg: RecipeConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# -- cross-field rules ------------------------------------------------------------------------------
def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Rules that involve more than one key (still no model architecture needed)."""
    try:
        cfg.basic.validate()
    except BasicConfigError as e:
        raise RecipeConfigError(str(e)) from None
    m, d, t, p, c = cfg.model, cfg.data, cfg.trainer, cfg.parallel, cfg.checkpoint
    if m.type == "hf":
        for key in ("llm_path", "vision_path"):
            if getattr(m, key) is None:
                raise bad_value(f"model.{key}", None, "a Hugging Face checkpoint folder (or embedded://...)",
                                "model.type is hf")
    if m.type == "tiny" and d.path != ["synthetic"] and not all(x.startswith("synthetic") for x in d.path):
        raise bad_value("data.path", d.path, "[synthetic]", "the tiny model has a 1024-token vocabulary and "
                        "16-pixel images; it trains on synthetic data only")
    if d.global_batch_size % d.micro_batch_size:
        raise bad_value("data.global_batch_size", d.global_batch_size,
                        f"a multiple of data.micro_batch_size ({d.micro_batch_size})")
    if t.fp8 is not None and t.precision not in ("auto", "bf16-mixed"):
        raise bad_value("trainer.precision", t.precision, "auto or bf16-mixed", "trainer.fp8 is set")
    if t.fp8_param and t.fp8 is None:
        raise bad_value("trainer.fp8_param", True, "false", "trainer.fp8 is null")
    if p.sequence_parallel and p.tensor == 1:
        raise bad_value("parallel.sequence_parallel", True, "false", "parallel.tensor is 1")
    if c.every_n_steps is not None and t.stop_after_steps is not None and t.stop_after_steps < c.every_n_steps:
        pass  # stopping saves a checkpoint anyway
    if cfg.optim.min_lr > cfg.optim.lr:
        raise bad_value("optim.min_lr", cfg.optim.min_lr, f"a number <= optim.lr ({cfg.optim.lr:g})")
    if cfg.run.stage == 1 and c.init_from is not None and c.init_from != "auto":
        raise bad_value("checkpoint.init_from", c.init_from, "null", "stage 1 starts from the pretrained LLM and "
                        "vision tower")
    return cfg


def resolve_runtime(cfg: RecipeConfig, cuda: bool, gpus_per_node: int = 0) -> dict:
    """Accelerator, devices, precision and distributed optimizer for this machine; checks what
    the CPU backend cannot do (bf16, FP8, distributed optimizer and sequence parallelism need CUDA)."""
    t, p = cfg.trainer, cfg.parallel
    accelerator = t.accelerator if t.accelerator != "auto" else ("gpu" if cuda else "cpu")
    if accelerator == "gpu" and not cuda:
        raise bad_value("trainer.accelerator", "gpu", "auto or cpu", "CUDA is not available here")
    on_gpu = accelerator == "gpu"
    devices = t.devices if t.devices is not None else (max(1, gpus_per_node) if on_gpu else 1)
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if on_gpu else "32")
    dist_opt = p.distributed_optimizer if p.distributed_optimizer is not None else on_gpu
    if not on_gpu:
        if precision != "32":
            raise bad_value("trainer.precision", precision, "auto or 32",
                            "on CPU Megatron's mixed precision asserts CUDA tensors")
        if t.fp8 is not None:
            raise bad_value("trainer.fp8", t.fp8, "null", "FP8 needs Transformer Engine on an H100-class GPU")
        if dist_opt:
            raise bad_value("parallel.distributed_optimizer", True, "null or false",
                            "the distributed optimizer needs CUDA")
        if p.sequence_parallel:
            raise bad_value("parallel.sequence_parallel", True, "false", "sequence parallelism needs "
                            "Transformer Engine (GPU)")
    world = devices * t.num_nodes
    mp = p.tensor * p.pipeline
    if world % mp:
        raise bad_value("parallel.tensor", p.tensor, f"sizes with tensor x pipeline dividing the {world} processes "
                        f"(trainer.devices x trainer.num_nodes)", f"tensor x pipeline = {mp}")
    dp = world // mp
    d = cfg.data
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise bad_value("data.global_batch_size", d.global_batch_size,
                        f"a multiple of micro_batch_size x data-parallel size = {d.micro_batch_size} x {dp}")
    return {"accelerator": accelerator, "devices": devices, "precision": precision,
            "distributed_optimizer": dist_opt, "data_parallel": dp, "world_size": world,
            "grad_accumulation": d.global_batch_size // (d.micro_batch_size * dp)}
