"""The model step of a recipe: architecture checks (no weights), the NeVA config, the Lightning module.

* `architecture(cfg)` reads the LLM and vision-tower shapes from the checkpoints' ``config.json``
  or from a named preset (`nemo_basic.recipes.presets`), the tiny model's from its builder;
* `check_model(cfg, runtime)` validates everything that depends on those shapes (k ≤ L, heads
  and query groups divisible by the tensor-parallel size, layers by the pipeline size, layers
  1..k spanning pipeline stages only without sequence parallelism, image tokens < sequence length) and reports parameter counts;
* `build_model_config(cfg, runtime)` makes the `BasicNevaConfig` (tiny: `nemo_basic.models.
  tiny`; hf: `nemo_basic.models.builder.basic_neva_config_from_hf`);
* `build_model(cfg, runtime, optim)` returns the Lightning module (`RecipeNevaModel`), which loads
  the pretrained Hugging Face weights into the Megatron modules right after they are built —
  unless a checkpoint is being resumed or a stage-2 run starts from a stage-1 checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from nemo_basic.models import feature_layer
from nemo_basic.recipes import presets
from nemo_basic.recipes.schema import EMBEDDED_SCHEME, RecipeConfig, RecipeConfigError, Runtime, bad_value

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm", "nemo_basic.pretrained:smollm2_dir"),
    "dinov2-small": ("vision", "nemo_basic.pretrained:dinov2_small_dir"),
}


@dataclasses.dataclass
class Architecture:
    """What the checks need, read without building anything."""

    llm: dict
    vision: dict
    num_layers: int
    k: int                       # BASIC supervision layers (0 when BASIC is off)
    image_size: int              # input side in pixels
    patch_size: int
    img_seq_len: int             # image embeddings per image after the projector
    projector: str               # model.projector
    padded_vocab: int
    spans_stages: bool = False   # layers 1..k lie on more than one pipeline stage (set by check_model)

    # parameter counts: transformers builds the module on `meta` (imported here, on first use)
    @property
    def llm_params(self) -> int:
        tiny = self.llm.get("model_type") == "tiny"  # the tiny LLM is Llama-shaped
        return presets.hf_parameters("llm", dict(self.llm, model_type="llama") if tiny else self.llm)

    @property
    def vision_params(self) -> int:  # the tiny model's tower is not a Hugging Face module
        return 0 if self.vision.get("model_type") == "tiny" else presets.hf_parameters("vision", self.vision)

    @property
    def projector_params(self) -> int:
        return presets.projector_parameters(self.projector, self.vision["hidden_size"], self.llm["hidden_size"])

    @property
    def total_params(self) -> int:
        return self.llm_params + self.vision_params + self.projector_params

    def summary(self) -> str:
        g = lambda n: f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"  # noqa: E731
        heads = self.llm["num_attention_heads"]
        kv = self.llm.get("num_key_value_heads") or heads
        return (f"LLM {self.num_layers} layers, hidden {self.llm['hidden_size']}, {heads} heads / {kv} "
                f"KV, vocab {self.llm['vocab_size']} (padded {self.padded_vocab}): {g(self.llm_params)}; "
                f"vision {self.vision['num_hidden_layers']} layers, hidden {self.vision['hidden_size']}, "
                f"{self.image_size} px / patch {self.patch_size} -> {self.img_seq_len} image tokens: "
                f"{g(self.vision_params)}; projector {g(self.projector_params)}; total {g(self.total_params)}; "
                f"BASIC k = {self.k}" + (" (layers 1..k span pipeline stages)" if self.spans_stages else ""))


# -- paths -------------------------------------------------------------------------------------------------
def is_embedded(path: Optional[str]) -> bool:
    return bool(path) and path.startswith(EMBEDDED_SCHEME)


def embedded_name(path: str, key: str, kind: str) -> str:
    name = path[len(EMBEDDED_SCHEME):]
    if name not in EMBEDDED_MODELS or EMBEDDED_MODELS[name][0] != kind:
        names = [n for n, (k, _) in EMBEDDED_MODELS.items() if k == kind]
        raise bad_value(key, path, " | ".join(EMBEDDED_SCHEME + n for n in names) + " or a checkpoint folder")
    return name


def resolve_model_path(path: str, key: str, kind: str) -> str:
    """A checkpoint folder; ``embedded://...`` is prepared (converted once, cached) here."""
    if is_embedded(path):
        import importlib

        module, fn = EMBEDDED_MODELS[embedded_name(path, key, kind)][1].split(":")
        return str(getattr(importlib.import_module(module), fn)())
    return os.path.abspath(os.path.expanduser(path))


# -- architecture -----------------------------------------------------------------------------------------
def _arch_of(cfg: RecipeConfig, kind: str) -> dict:
    m = cfg.model
    path, preset = (m.llm_path, m.llm_arch) if kind == "llm" else (m.vision_path, m.vision_arch)
    key_path, key_preset = (f"model.{kind}_path", f"model.{kind}_arch")
    if is_embedded(path):  # the preset of its name: the checks come before the one-time conversion
        if preset is not None:
            presets.resolve(kind, None, preset, key_path, key_preset)  # the name must exist
        return presets.resolve(kind, None, embedded_name(path, key_path, kind), key_path, key_preset)
    return presets.resolve(kind, os.path.expanduser(path) if path else None, preset, key_path, key_preset)


def architecture(cfg: RecipeConfig, tensor_parallel: Optional[int] = None) -> Architecture:
    from nemo_basic.convert.llama import padded_vocab_size

    m = cfg.model
    if m.type == "tiny":
        from nemo_basic.models import tiny

        llm, vision = tiny.architecture(m.tiny_num_layers)
    else:
        llm, vision = _arch_of(cfg, "llm"), _arch_of(cfg, "vision")
    L = llm["num_hidden_layers"]
    try:
        k = cfg.basic.num_supervision_layers(L) if cfg.basic.active else 0
    except ValueError as e:
        raise RecipeConfigError(f"{e} (the LLM has {L} layers)") from None
    patch = vision["patch_size"]
    size = m.image_size or (vision["image_size"] if vision.get("model_type") != "dinov2" else 224)
    if size % patch:
        raise bad_value("model.image_size", size, f"a multiple of the patch size {patch}")
    cls = 1 if vision.get("class_token", True) and not m.drop_vision_class_token else 0
    img_seq_len = (size // patch) ** 2 + cls
    tp = tensor_parallel or cfg.parallel.tensor
    padded = padded_vocab_size(llm["vocab_size"], 128, tp)
    return Architecture(llm=llm, vision=vision, num_layers=L, k=k, image_size=size, patch_size=patch,
                        img_seq_len=img_seq_len, projector=m.projector, padded_vocab=padded)


def check_model(cfg: RecipeConfig, runtime: Optional[Runtime] = None) -> Architecture:
    """Validate the settings that depend on the model's shape; returns the architecture."""
    arch = architecture(cfg)
    m, p, llm, vision = cfg.model, cfg.parallel, arch.llm, arch.vision
    nh = llm["num_attention_heads"]
    nkv = llm.get("num_key_value_heads") or nh
    if nh % p.tensor or nkv % p.tensor and p.tensor % nkv:
        raise bad_value("parallel.tensor", p.tensor, f"a size dividing the {nh} attention heads and the {nkv} "
                        "key-value heads")
    if vision["num_attention_heads"] % p.tensor:
        raise bad_value("parallel.tensor", p.tensor,
                        f"a size dividing the vision tower's {vision['num_attention_heads']} heads")
    L = arch.num_layers
    first = p.num_layers_in_first_pipeline_stage
    if p.pipeline > 1:
        if first is None and L % p.pipeline:
            raise bad_value("parallel.pipeline", p.pipeline, f"a size dividing the {L} layers (or set "
                            "parallel.num_layers_in_first_pipeline_stage)")
        first = first or L // p.pipeline
        if first >= L:
            raise bad_value("parallel.num_layers_in_first_pipeline_stage", first, f"an integer < {L}")
        # layers 1..k may span stages: the supervision rides in the activation the stages exchange
        # (nemo_basic.models.pipeline), which sequence parallelism shards along that dimension
        arch.spans_stages = arch.k > first
        if arch.spans_stages and p.sequence_parallel:
            raise bad_value("parallel.sequence_parallel", True, "false", f"basic.layers = {arch.k} spans pipeline "
                            f"stages (the first holds {first} layers) and the supervision then travels along the "
                            "sequence dimension of the activation, which sequence parallelism splits; or lower "
                            f"basic.layers to {first}")
    elif first is not None:
        raise bad_value("parallel.num_layers_in_first_pipeline_stage", first, "null", "parallel.pipeline is 1")
    max_pos = llm.get("max_position_embeddings")
    if max_pos and m.seq_length > max_pos and m.type != "tiny":
        raise bad_value("model.seq_length", m.seq_length, f"an integer <= {max_pos}",
                        "the LLM's max_position_embeddings")
    if m.seq_length <= arch.img_seq_len:
        raise bad_value("model.seq_length", m.seq_length, f"an integer > {arch.img_seq_len}",
                        "the image alone takes that many tokens")
    if m.type == "hf" and llm.get("model_type") in SUPPORTED_LLM_TYPES:
        from nemo_basic.convert.families import family_of_model_type, sliding_window_of

        window = sliding_window_of(llm, family_of_model_type(llm["model_type"]))
        if window is not None and m.seq_length > window:  # else a ValueError from the converter, deep in the run
            raise bad_value("model.seq_length", m.seq_length, f"an integer <= {window}",
                            f"the LLM's sliding_window in model.llm_path's config.json: Megatron's attention "
                            "here is full causal, so longer sequences would differ from the Hugging Face model")
    L_vis = vision["num_hidden_layers"]
    why = feature_layer.problem(m.vision_feature_layer, L_vis)
    if why:
        raise bad_value("model.vision_feature_layer", m.vision_feature_layer, why)
    if m.type == "hf" and not m.freeze_vision_model:
        raise bad_value("model.freeze_vision_model", False, "true", "the Hugging Face vision tower is frozen in "
                        "this version (as in LLaVA-1.5 and BASIC)")
    if runtime is not None and (cfg.trainer.fp8 is not None or cfg.parallel.sequence_parallel):
        from nemo_basic.models.specs import have_transformer_engine

        if not have_transformer_engine():  # a CUDA machine without TE trains on Megatron's local spec
            if cfg.trainer.fp8 is not None:
                raise bad_value("trainer.fp8", cfg.trainer.fp8, "null", "FP8 needs Transformer Engine (the NGC "
                                "container); this machine trains in bf16 on Megatron's local layers")
            raise bad_value("parallel.sequence_parallel", True, "false", "sequence parallelism needs Transformer "
                            "Engine's layers (the NGC container)")
    return arch


from nemo_basic.convert.families import SUPPORTED_MODEL_TYPES as SUPPORTED_LLM_TYPES  # noqa: E402  (issue 16)


def training_blockers(cfg: RecipeConfig, arch: Architecture) -> list:
    """Reasons this recipe cannot train in this version although its configuration is valid."""
    out = []
    mt = arch.llm.get("model_type")
    if cfg.model.type == "hf" and mt not in SUPPORTED_LLM_TYPES:
        out.append(f"model.llm_path: the LLM is a {mt!r} model; this version converts Hugging Face "
                   f"{' / '.join(SUPPORTED_LLM_TYPES)} checkpoints only (nemo_basic.convert)")
    return out


# -- config and module ------------------------------------------------------------------------------------------
def _apply_common(config, cfg: RecipeConfig, runtime: Runtime):
    m = cfg.model
    config.freeze_language_model = cfg.freeze_language_model
    config.freeze_vision_model = m.freeze_vision_model
    config.freeze_vision_projection = m.freeze_projector
    config.drop_vision_class_token = m.drop_vision_class_token
    config.train_first_token_after_image = m.train_first_token_after_image
    config.vision_feature_layer = m.vision_feature_layer
    config.tensor_model_parallel_size = cfg.parallel.tensor
    config.pipeline_model_parallel_size = cfg.parallel.pipeline
    config.sequence_parallel = cfg.parallel.sequence_parallel
    lm = config.language_transformer_config
    lm.pipeline_dtype = config.pipeline_dtype = runtime.dtype
    if cfg.parallel.num_layers_in_first_pipeline_stage is not None:
        lm.num_layers_in_first_pipeline_stage = cfg.parallel.num_layers_in_first_pipeline_stage
    return config


def build_model_config(cfg: RecipeConfig, runtime: Runtime, llm_dir: Optional[str] = None,
                       vision_dir: Optional[str] = None, load_vision_weights: bool = True):
    """The `BasicNevaConfig` of the recipe (nothing is allocated; the vision tower reads its
    weights from ``vision_dir`` when the model is built, unless ``load_vision_weights`` is off)."""
    from nemo_basic.models.neva import BasicNevaConfig

    m = cfg.model
    if m.type == "tiny":
        from nemo_basic.models import tiny

        config = tiny.tiny_neva_config(BasicNevaConfig, num_layers=m.tiny_num_layers, basic=cfg.basic)
        config.language_transformer_config.seq_length = m.seq_length
        config.seq_length = m.seq_length
        return _apply_common(config, cfg, runtime)
    from nemo_basic.models import builder
    from nemo_basic.models.vision import vision_config_from_hf

    vision_dir = vision_dir or resolve_model_path(m.vision_path, "model.vision_path", "vision")
    vision = vision_config_from_hf(vision_dir, image_size=m.image_size, load_weights=load_vision_weights)
    config = builder.basic_neva_config_from_hf(
        llm_dir or resolve_model_path(m.llm_path, "model.llm_path", "llm"), vision,
        basic=cfg.basic, vision_feature_layer=m.vision_feature_layer, projector=m.projector,
        seq_length=m.seq_length, tensor_model_parallel_size=cfg.parallel.tensor,
        pipeline_model_parallel_size=cfg.parallel.pipeline, drop_vision_class_token=m.drop_vision_class_token)
    return _apply_common(config, cfg, runtime)


def build_model(cfg: RecipeConfig, runtime: Runtime, optim, llm_dir: Optional[str] = None,
                vision_dir: Optional[str] = None):
    """(Lightning module, tokenizer, image processor) for the recipe; weights are allocated later,
    by the strategy (``configure_model``)."""
    arch = architecture(cfg)
    config = build_model_config(cfg, runtime, llm_dir, vision_dir)
    from nemo_basic.recipes.module import RecipeNevaModel as cls  # imports NeMo: only when a run starts
    if cfg.model.type == "tiny":
        from nemo_basic.models import tiny

        return cls(config, optim=optim, tokenizer=tiny.TinyTokenizer(), img_seq_len=arch.img_seq_len,
                   init_seed=cfg.run.seed), None, None
    from nemo_basic.models import builder

    img_seq_len = builder.image_seq_length(config)
    if img_seq_len != arch.img_seq_len:
        raise RecipeConfigError(f"internal: {img_seq_len} image tokens built, {arch.img_seq_len} expected")
    tokenizer = builder.tokenizer_from_hf(llm_dir)
    model = cls(config, optim=optim, tokenizer=tokenizer, pretrained={"llm_dir": llm_dir}, img_seq_len=img_seq_len)
    return model, tokenizer, image_processor(config.vision_transformer_config)


def image_processor(vision) -> Any:
    """The vision tower's HF image processor at the tower's input size (`models.vision.image_processor_for`)."""
    from nemo_basic.models.vision import image_processor_for

    try:
        return image_processor_for(vision)
    except ValueError as e:
        raise RecipeConfigError(str(e)) from None
