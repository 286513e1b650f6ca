"""The recipe configuration: YAML layers (omegaconf) validated by one pydantic model, `RecipeConfig`.

A recipe YAML (``conf/*.yaml``) may start from another one (``base: other.yaml``, relative to it);
the command-line ``key=value`` overrides (omegaconf dotlist) go on top. omegaconf merges the layers
as plain containers and resolves ``${oc.env:...}``; `RecipeConfig`, where each key is declared once
(type, allowed values, default, description: `describe_keys`), validates the result. Every problem
is a `RecipeConfigError` naming the key, raised before anything heavy is imported or built:

* unknown key      → ``unknown key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)``
* wrong type       → ``trainer.max_steps = 'abc' is invalid: expected null (epochs over the data) or an integer >= 1``
* bad choice/range → ``trainer.precision = 'bf17' is invalid: expected one of auto | 32 | bf16-mixed | 16-mixed``

Checks that need the model's shape (``basic.layers`` ≤ number of layers, heads divisible by the
tensor-parallel size, …) run in `nemo_basic.recipes.model.check_model` from the architecture
alone (the checkpoint's ``config.json`` or a named preset), still without building anything.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Annotated, Any, List, Literal, Optional, Sequence

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from nemo_basic.models.basic_config import BasicConfig, BasicConfigError, expected, field_infos, unwrap

EMBEDDED_SCHEME = "embedded://"
Text = Annotated[str, Field(min_length=1)]


class RecipeConfigError(ValueError):
    """A recipe setting is invalid; the message names the key (``trainer.max_steps``)."""


def knob(default: Any = None, doc: str = "", null: Optional[str] = None, **constraints):
    """A key's default, constraints and description (``null``: what null means, for the messages)."""
    return Field(default, description=doc, json_schema_extra={"null": null} if null else None, **constraints)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# -- the schema -------------------------------------------------------------------------------------
class RunConfig(Section):
    name: Optional[Text] = knob(None, "run name (null: the config file's name without _stage1/_stage2); the run "
                                      "folder is <log_dir>/<name>/stage<stage>")
    stage: Optional[int] = knob(None, "1: alignment (projector only), 2: instruction tuning (projector + LLM); "
                                      "null: set by the entry point (basic_pretrain.py: 1, basic_finetune.py: 2)",
                                null="set by the entry point", ge=1, le=2)
    log_dir: Text = knob("runs", "root folder of the runs (relative paths: to the working directory)")
    seed: int = knob(1234, "seed of the model initialisation and the data order", ge=0)
    verbose: bool = knob(False, "print NeMo's, Megatron's and Lightning's set-up messages and every rank's output "
                                "(false: they go to <run folder>/recipe/console-filtered-rank<R>.txt)")


class ModelConfig(Section):
    type: Literal["hf", "tiny"] = knob("hf", "hf: Hugging Face LLM + vision tower; tiny: tiny random NeVA (tests)")
    llm_path: Optional[Text] = knob(None, "HF checkpoint folder of the LLM (or embedded://smollm2-135m)")
    vision_path: Optional[Text] = knob(None, "HF checkpoint folder of the vision tower (or embedded://dinov2-small)")
    llm_arch: Optional[Text] = knob(None, "preset architecture used for checks while llm_path is a placeholder")
    vision_arch: Optional[Text] = knob(None, "preset architecture of the vision tower (checks without files)")
    vision_feature_layer: int = knob(-2, "hidden state of the vision tower fed to the projector (-1: last)")
    drop_vision_class_token: bool = knob(True, "drop the class token (LLaVA-1.5: 576 patches at 336 px)")
    train_first_token_after_image: bool = knob(
        True, "train the prediction of the first token after each image, as LLaVA does (false: NeVA's loss mask, "
              "which never trains it)")
    projector: Literal["mlp2x_gelu", "linear"] = knob("mlp2x_gelu", "vision projector")
    image_size: Optional[int] = knob(None, "input side of the vision tower in pixels (null: the tower's own)",
                                     null="the tower's own", ge=1)
    seq_length: int = knob(2048, "LLM sequence length (text + image embeddings)", ge=2)
    freeze_language_model: Optional[bool] = knob(None, "freeze the LLM",
                                                 null="stage default: frozen in stage 1, trained in 2")
    freeze_vision_model: bool = knob(True, "freeze the vision tower (BASIC and LLaVA-1.5 keep it frozen)")
    freeze_projector: bool = knob(False, "freeze the projector")
    tiny_num_layers: int = knob(4, "decoder layers of the tiny model (type: tiny)", ge=1)


class DataConfig(Section):
    path: Annotated[List[Text], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = Field(
        default_factory=lambda: [EMBEDDED_SCHEME + "stage1"], min_length=1,
        description="prepared shard folders (scripts/prepare_llava_data.py), embedded://stage1|stage2, or "
                    "synthetic (type: tiny); a single path is a list of one")
    template: Optional[Literal["plain", "vicuna_v1"]] = knob(
        None, "prompt template (null: plain in stage 1, vicuna_v1 in stage 2)")
    micro_batch_size: int = knob(4, "samples per forward pass per data-parallel rank", ge=1)
    global_batch_size: int = knob(256, "samples per optimizer step (all ranks, all micro-batches)", ge=1)
    num_workers: int = knob(2, "data-loader worker processes per rank", ge=0)
    image_process_mode: Literal["pad", "crop"] = knob("pad", "pad (LLaVA-1.5: pad to square) or crop")
    pad_to_seq_length: Optional[bool] = knob(None, "pad batches to seq_length (null: only under pipeline "
                                                   "parallelism)", null="auto")
    shuffle: bool = knob(True, "seeded shuffle per epoch")
    max_bad_sample_share: float = knob(0.001, "corrupt samples are skipped and reported; the run stops past this "
                                              "share of the records (per data-loader process)", ge=0, le=1)
    embedded_num_synthetic: int = knob(400, "synthetic scenes of the embedded data set", ge=1)


class TrainerConfig(Section):
    max_steps: Optional[int] = knob(None, "optimizer steps (null: `epochs` passes over the data)",
                                    null="epochs over the data", ge=1)
    epochs: float = knob(1.0, "passes over the data when max_steps is null", gt=0)
    stop_after_steps: Optional[int] = knob(None, "stop with a checkpoint after this many steps in this job (Slurm "
                                                 "job chains; the next launch resumes)", ge=1)
    accelerator: Literal["auto", "cpu", "gpu"] = knob("auto", "auto: gpu when CUDA is available, else cpu")
    devices: Optional[int] = knob(None, "processes per node (null: all GPUs, or 1 on CPU)",
                                  null="all GPUs / 1 CPU process", ge=1)
    num_nodes: int = knob(1, "nodes", ge=1)
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = knob("auto", "auto: bf16-mixed on GPU, 32 on CPU")
    fp8: Optional[Literal["hybrid", "e4m3"]] = knob(None, "FP8 with Transformer Engine (H100)")
    fp8_recipe: Literal["delayed", "tensorwise"] = knob("delayed", "FP8 scaling recipe")
    fp8_param: bool = knob(False, "FP8 primary weights (TE's fp8_model_init; the distributed optimizer then "
                                  "gathers FP8): off keeps bf16 weights with FP8 GEMMs. Never run with NeVA, nor "
                                  "a bf16 stage-1 checkpoint restored into FP8 weights")
    log_every_n_steps: int = knob(1, "logging interval (TensorBoard, console, metrics.jsonl)", ge=1)
    progress_bar: bool = knob(True, "console progress bar")


class ParallelConfig(Section):
    tensor: int = knob(1, "tensor-parallel size", ge=1)
    pipeline: int = knob(1, "pipeline-parallel size", ge=1)
    sequence_parallel: bool = knob(False, "sequence parallelism (needs tensor > 1 and Transformer Engine)")
    distributed_optimizer: Optional[bool] = knob(None, "shard optimizer state over data-parallel ranks (null: on "
                                                       "GPU yes, on CPU no)", null="auto")
    num_layers_in_first_pipeline_stage: Optional[int] = knob(
        None, "uneven pipeline split: layers on the first stage (null: even split)", null="even split", ge=1)
    overlap_grad_reduce: bool = knob(True, "overlap the data-parallel gradient reduce (GPU)")
    overlap_param_gather: bool = knob(True, "overlap the parameter all-gather (GPU, distributed optimizer)")


class OptimConfig(Section):
    lr: float = knob(1e-3, "peak learning rate", gt=0)
    min_lr: float = knob(0.0, "learning rate at the end of the cosine", ge=0)
    warmup_ratio: float = knob(0.03, "share of the steps spent warming up (linear)", ge=0, le=1)
    warmup_steps: Optional[int] = knob(None, "warm-up steps (overrides warmup_ratio)", null="warmup_ratio", ge=0)
    weight_decay: float = knob(0.0, "AdamW decoupled weight decay", ge=0)
    adam_beta1: float = knob(0.9, "AdamW beta1", ge=0, le=1)
    adam_beta2: float = knob(0.999, "AdamW beta2", ge=0, le=1)
    adam_eps: float = knob(1e-8, "AdamW epsilon", gt=0)
    clip_grad: float = knob(1.0, "gradient-norm clipping (0: off)", ge=0)


class CheckpointConfig(Section):
    every_n_steps: Optional[int] = knob(None, "save every N steps (null: only at the end)", null="only at the end",
                                        ge=1)
    keep: int = knob(2, "checkpoints kept besides the last one", ge=1)
    resume: bool = knob(True, "resume from the last checkpoint of this run if there is one")
    init_from: Optional[Text] = knob(None, "stage 2: the stage-1 run folder or checkpoint to start from (weights "
                                           "only); auto: <log_dir>/<name>/stage1; null: the pretrained LLM and a "
                                           "fresh projector")
    async_save: bool = knob(False, "asynchronous checkpoint saving (GPU)")


class AnalysisConfig(Section):  # issue 12: the alignment monitor during training (nemo_basic.analysis.callback)
    every_n_steps: Optional[int] = knob(None, "log the layer-0 lens metrics of a fixed probe set of scenes every N "
                                              "steps (and at the last step); null: off", null="off", ge=1)
    scenes: int = knob(8, "synthetic scenes in the probe set (fixed for the run)", ge=1)
    seed: int = knob(0, "seed of the probe scenes (a stream the training data never uses)", ge=0)
    pictures: bool = knob(True, "also write the lens picture of the first scene at each analysis step")


class RecipeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: Optional[Text] = knob(None, "YAML this one starts from (resolved when loading)")
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    basic: BasicConfig = Field(default_factory=BasicConfig)  # nemo_basic.models.basic_config
    data: DataConfig = Field(default_factory=DataConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

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


# -- keys, their allowed values and the messages ------------------------------------------------------
def _walk(cls=RecipeConfig, prefix: str = ""):
    """(dotted key, FieldInfo, is a section) of every key and section, in schema order."""
    for name, info in field_infos(cls).items():
        kind = unwrap(info.annotation)[0]
        section = isinstance(kind, type) and (issubclass(kind, BaseModel) or dataclasses.is_dataclass(kind))
        yield prefix + name, info, section
        if section:
            yield from _walk(kind, prefix + name + ".")


def _info(key: str):
    return next((info for k, info, _ in _walk() if k == key), None)


def all_keys() -> List[str]:
    """Every leaf key of the schema (``trainer.max_steps``, …)."""
    return [key for key, _, section in _walk() if not section]


def describe_keys() -> str:
    """Every key with its allowed values, default and description (``--help-config``)."""
    return "\n".join(f"{key} = {info.get_default(call_default_factory=True)!r}: {expected(info)}\n"
                     f"    {info.description}" for key, info, section in _walk() if not section)


def _did_you_mean(key: str) -> str:
    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    match = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]  # a right name in the wrong section
    if not match:
        match = difflib.get_close_matches(key, keys + list(RecipeConfig.model_fields), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def bad_value(key: str, value: Any, allowed: Optional[str] = None, why: str = "") -> RecipeConfigError:
    allowed = allowed or (expected(info) if (info := _info(key)) else "?")
    extra = f" ({why})" if why else ""
    return RecipeConfigError(f"{key} = {value!r} is invalid: expected {allowed}{extra}")


def _lookup(tree: Any, parts: Sequence[str]):
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _translate(error: ValidationError, merged: dict, layers: Sequence[tuple]) -> RecipeConfigError:
    """pydantic's first error (unknown keys first) → a RecipeConfigError naming the key."""
    unknown = ("extra_forbidden", "unexpected_keyword_argument")
    err = sorted(error.errors(), key=lambda e: e["type"] not in unknown)[0]
    loc = [str(p) for p in err["loc"]]
    if err["type"] in unknown:
        key = ".".join(loc)
        where = [source for source, raw in layers if _lookup(raw, loc) is not None and source != "command line"]
        return RecipeConfigError(f"unknown key '{key}'{_did_you_mean(key)}" + (f" [{where[-1]}]" if where else ""))
    if isinstance((err.get("ctx") or {}).get("error"), BasicConfigError):
        return RecipeConfigError(str(err["ctx"]["error"]))
    while len(loc) > 1 and _info(".".join(loc)) is None:  # a list item → the list's key
        loc.pop()
    key, value = ".".join(loc), _lookup(merged, loc)
    info = _info(key)
    if info is not None and unwrap(info.annotation)[0] is float and type(value) is int:
        value = float(value)
    return bad_value(key, value)


# -- loading --------------------------------------------------------------------------------------
def _keep_text(raw: dict, text_of) -> dict:
    """Undo YAML's coercion where the schema says string: ``run.name: off`` stays 'off', not False
    (``text_of(key)``: the text as written, or None)."""
    for key, info, _ in _walk():
        kind = unwrap(info.annotation)[0]
        *section, leaf = key.split(".")
        owner = _lookup(raw, section)
        if (kind is str or typing.get_origin(kind) is Literal and all(isinstance(a, str) for a in kind.__args__)) \
                and isinstance(owner, dict) and isinstance(owner.get(leaf), (bool, int, float)):
            owner[leaf] = text_of(key) or owner[leaf]
    return raw


def _yaml_text(path: str):
    """key → the text of its plain (unquoted) scalar in the YAML file at ``path``."""
    import yaml

    with open(path) as f:
        root = yaml.compose(f)

    def text_of(key: str) -> Optional[str]:
        node = root
        for part in key.split("."):
            node = dict((k.value, v) for k, v in node.value).get(part) if isinstance(node, yaml.MappingNode) else None
        return node.value if isinstance(node, yaml.ScalarNode) and node.style is None else None

    return text_of


def _read_yaml(path: str, seen: Sequence[str] = ()) -> List[tuple]:
    """[(source, dict)] of ``path`` and the YAMLs it starts from (``base:``), base first."""
    from omegaconf import OmegaConf

    path = os.path.abspath(path)
    if path in seen:
        raise RecipeConfigError(f"base: cycle through {path}")
    if not os.path.isfile(path):
        raise RecipeConfigError(f"config file {path} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as e:  # yaml syntax
        raise RecipeConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeConfigError(f"{path}: expected a mapping at the top level")
    _keep_text(raw, _yaml_text(path))
    chain = []
    base = raw.get("base")
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        chain.extend(_read_yaml(base_path, (*seen, path)))
    raw["base"] = None
    chain.append((path, raw))
    return chain


def _parse_overrides(overrides: Sequence[str]) -> dict:
    from omegaconf import OmegaConf

    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise RecipeConfigError(f"override {o!r} is not of the form key=value (e.g. trainer.max_steps=2)")
    try:
        raw = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except Exception as e:
        raise RecipeConfigError(f"cannot parse the overrides {list(overrides)}: {e}") from None
    texts = dict(o.split("=", 1) for o in overrides)
    return _keep_text(raw, texts.get)


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

    layers: List[tuple] = _read_yaml(path) if path else []
    if overrides:
        layers.append(("command line", _parse_overrides(overrides)))
    try:
        merged = OmegaConf.merge({}, *(raw for _, raw in layers))
        merged = OmegaConf.to_container(merged, resolve=True)  # ${oc.env:...} and friends
    except errors.OmegaConfBaseException as e:
        raise RecipeConfigError(f"cannot merge or resolve {getattr(e, 'full_key', '') or 'the configuration'}: "
                                f"{str(e).splitlines()[0]}") from None
    try:
        obj = RecipeConfig.model_validate(merged)
    except ValidationError as e:
        raise _translate(e, merged, layers) from None
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

    return OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump()))


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
    if cfg.optim.min_lr > cfg.optim.lr:
        raise bad_value("optim.min_lr", cfg.optim.min_lr, f"a number <= optim.lr ({cfg.optim.lr:g})")
    if cfg.run.stage == 1 and c.init_from is not None and c.init_from != "auto":
        raise bad_value("checkpoint.init_from", c.init_from, "null", "stage 1 starts from the pretrained LLM and "
                        "vision tower")
    return cfg


@dataclasses.dataclass
class Runtime:
    """The run's facts on this machine: `resolve_runtime` decides the first seven, the recipe's
    preflight (`nemo_basic.recipes.train.preflight`) adds the rest."""

    accelerator: str                 # cpu | gpu
    devices: int                     # processes per node
    precision: str                   # 32 | bf16-mixed | 16-mixed
    distributed_optimizer: bool
    data_parallel: int
    world_size: int
    grad_accumulation: int           # micro-batches per step and data-parallel rank
    init_from: Optional[str] = None  # stage 2: the stage-1 checkpoint it starts from
    arch: Any = None                 # nemo_basic.recipes.model.Architecture
    blockers: List[str] = dataclasses.field(default_factory=list)  # why it cannot train (valid config)
    notes: List[str] = dataclasses.field(default_factory=list)     # what --check could not see here

    @property
    def on_gpu(self) -> bool:
        return self.accelerator == "gpu"

    @property
    def dtype(self):
        """The torch dtype of the weights and of the activations the pipeline stages exchange."""
        import torch

        return {"32": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[self.precision]


def resolve_runtime(cfg: RecipeConfig, cuda: bool, gpus_per_node: int = 0) -> Runtime:
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
    return Runtime(accelerator=accelerator, devices=devices, precision=precision, distributed_optimizer=dist_opt,
                   data_parallel=dp, world_size=world,
                   grad_accumulation=d.global_batch_size // (d.micro_batch_size * dp))
