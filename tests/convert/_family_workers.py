"""Tiny random Hugging Face models of each converted family, and the spawned TP=2 body of the
family tests (nemo_basic.testing.run_distributed re-imports this module by path)."""
from __future__ import annotations

import nemo_basic  # noqa: F401  (first: CPU backend patches before Megatron is used)

from pathlib import Path

import torch
import torch.distributed as dist

VOCAB = 500          # Megatron pads it to 512
HIDDEN, FFN, HEADS = 64, 96, 4
IMG, PATCH = 28, 7   # CLIP / SigLIP towers: 16 patches
M = (IMG // PATCH) ** 2
IMAGE_TOKEN_ID = VOCAB - 1
FAMILIES = ("qwen2", "llama3", "mistral", "gemma", "phi3")


def hf_text_config(family: str, kv_heads: int | None = None, layers: int = 2):
    """Each family's distinguishing features, at toy size; grouped-query where the family uses it
    (Gemma-2B: multi-query, one KV head)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                  num_attention_heads=HEADS, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="eager")
    if family == "qwen2":  # q/k/v biases, tied embeddings (Qwen2.5-0.5B/1.5B/3B)
        return transformers.Qwen2Config(num_key_value_heads=kv_heads or 2, tie_word_embeddings=True,
                                        rope_theta=1000000.0, **common)
    if family == "llama3":  # rope_scaling llama3 with a short original context so all three bands occur
        return transformers.LlamaConfig(num_key_value_heads=kv_heads or 2, tie_word_embeddings=False,
                                        rope_theta=10000.0, rope_scaling=dict(
                                            rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=32), **common)
    if family == "mistral":  # a sliding window longer than the sequences used
        return transformers.MistralConfig(num_key_value_heads=kv_heads or 2, sliding_window=256, head_dim=16,
                                          tie_word_embeddings=False, rope_theta=1000000.0, **common)
    if family == "gemma":  # head_dim != hidden / heads, as Gemma-2B's 256 with 2048 / 8
        return transformers.GemmaConfig(num_key_value_heads=kv_heads or 1, head_dim=32,
                                        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, **common)
    if family == "phi3":
        return transformers.Phi3Config(num_key_value_heads=kv_heads or 2, tie_word_embeddings=False,
                                       original_max_position_embeddings=256, **common)
    raise ValueError(family)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that a wrong mapping moves the logits by O(1); norms and biases far
    from their initial 1 / 0 (Gemma's zero-centred norms: far from 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g) - (1.0 if "gemma" in
                        type(model).__name__.lower() else 0.0))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3, generator=g)
            elif "vision" not in name:
                p.normal_(0.0, 0.15, generator=g)
    return model


def tiny_hf_lm(family: str, kv_heads: int | None = None, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_text_config(family, kv_heads), attn_implementation="eager")
    return randomise(model, seed).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB - 1)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    out.add_special_tokens({"additional_special_tokens": ["<image>"]})  # id 499
    return out


def make_hf_llava(path: Path, family: str, tower: str = "clip", seed: int = 0) -> Path:
    """A tiny HF LLaVA directory: the family's LLM + a CLIP ('default' strategy) or SigLIP ('full')."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              SiglipImageProcessor, SiglipVisionConfig)

    torch.manual_seed(seed)
    if tower == "clip":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=IMG, patch_size=PATCH, projection_dim=32)
        proc, strategy = CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG}), \
            "default"
    else:
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=IMG, patch_size=PATCH)
        proc, strategy = SiglipImageProcessor(size={"height": IMG, "width": IMG}), "full"
    text = hf_text_config(family)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                      image_seq_length=M, tie_word_embeddings=text.tie_word_embeddings)
    model = randomise(LlavaForConditionalGeneration(cfg), seed)
    if family == "gemma":  # randomise() keys Gemma's zero-centred norms off the class name
        with torch.no_grad():
            for name, p in model.model.language_model.named_parameters():
                if "norm" in name:
                    p.sub_(1.0)
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    proc.save_pretrained(str(path))
    return path


def llava_inputs(batch: int = 2, pre: int = 3, post: int = 6, seed: int = 0):
    """One sample in both conventions, and the matching LM-loss labels.

    NeVA: ids = T[:-1], labels = T[1:] with T = [pre, <image>, post]; its loss mask drops the
    image rows and the prediction of the image. HF: the expanded ids, labels = ids with the image
    block ignored (-100); ``hf_labels_neva`` also ignores the first token after it (upstream NeVA
    masks that prediction)."""
    g = torch.Generator().manual_seed(seed)
    ids_pre = torch.randint(3, VOCAB - 1, (batch, pre), generator=g)
    ids_post = torch.randint(3, VOCAB - 1, (batch, post), generator=g)
    full_neva = torch.cat([ids_pre, torch.full((batch, 1), -200), ids_post], 1)
    hf_ids = torch.cat([ids_pre, torch.full((batch, M), IMAGE_TOKEN_ID), ids_post], 1)
    hf_labels = hf_ids.clone()
    hf_labels[:, pre:pre + M] = -100
    hf_labels_neva = hf_labels.clone()  # upstream NeVA also never trains the first token after the image
    hf_labels_neva[:, pre + M] = -100
    pixels = torch.randn(batch, 3, IMG, IMG, generator=g)
    return dict(hf_ids=hf_ids, hf_labels=hf_labels, hf_labels_neva=hf_labels_neva, neva_ids=full_neva[:, :-1],
                neva_labels=full_neva[:, 1:], neva_full=full_neva, pixels=pixels)


def trains_first_token_after_image(model) -> bool:
    """Whether our NeVA trains the prediction of the token after an image, as HF LLaVA does (the
    lead's BasicMCoreNevaModel switch), or masks it as upstream NeVA."""
    return hasattr(model, "_supervise_first_token_after_image") and bool(
        getattr(model.config, "train_first_token_after_image", True))


def neva_from_hf_llava(hf_dir: str, tp: int = 1):
    """Our NeVA (Megatron LLaVA, BASIC off) for an HF LLaVA directory on this rank, weights loaded."""
    from nemo_basic.export.hf import ensure_microbatch_calculator, load_hf_llava_weights, neva_config_from_hf_llava
    from nemo_basic.models.basic_config import BasicConfig

    config, _ = neva_config_from_hf_llava(hf_dir, basic=BasicConfig(enabled=False), seq_length=64,
                                          tensor_model_parallel_size=tp)
    ensure_microbatch_calculator()
    model = config.configure_model(None).eval()
    load_hf_llava_weights(model, hf_dir)
    return model


def neva_logits_and_loss(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-gathered logits without labels; the LM loss (NeMo's masked token mean) with labels."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, t = inputs["neva_ids"].shape
    kw = dict(input_ids=inputs["neva_ids"], position_ids=torch.arange(t)[None].expand(b, -1),
              images=inputs["pixels"], num_image_tiles=torch.ones(b, dtype=torch.int))
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(**kw).contiguous())
        per_token, mask = model(**kw, labels=inputs["neva_labels"], loss_mask=torch.ones(b, t))
    loss = (per_token.float() * mask).sum() / mask.sum()
    return logits, loss, trains_first_token_after_image(model)


def tp2_worker(rank: int, world: int, cases: dict, llava_dir: str, inputs: dict) -> dict:
    """TP=2: each family's GPT logits on text (from the full converted state dict), and the vocab-500
    LLaVA's logits and LM loss."""
    from megatron.core import parallel_state as ps

    from nemo_basic.convert import (build_gpt_model, ensure_model_parallel, hf_llama_config_to_mcore,
                                    load_mcore_state_dict, shard_for_tp)

    ensure_model_parallel(world)
    out = {}
    for name, (hf_config, full_sd, ids) in cases.items():
        config = hf_llama_config_to_mcore(hf_config, tensor_model_parallel_size=world)
        model = build_gpt_model(config, parallel_output=True).eval()
        load_mcore_state_dict(model, shard_for_tp(full_sd, world, rank, config))
        with torch.no_grad():
            local = model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        out[name] = torch.cat(parts, dim=-1)
    out["llava_logits"], out["llava_loss"], out["trains_first"] = neva_logits_and_loss(
        neva_from_hf_llava(llava_dir, tp=world), inputs)
    return out
