"""A tiny random Hugging Face LLaVA with a word-level tokenizer (real colour / shape words among
filler words), and the rank function that re-saves one of our checkpoints under TP=2."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

import nemo_basic  # noqa: F401  (CPU backend first)

IMG, PATCH = 28, 7            # CLIP: 4 x 4 = 16 patches + class token
M = (IMG // PATCH) ** 2
VOCAB = 256                   # embedding rows (more than the tokenizer: padding rows never win)
WORDS = ["red", "green", "blue", "white", "gray", "circle", "square", "triangle", "background",
         "the", "and", "of", "with", "is", "ab", "x1", "..."]
TOKENS = 250                  # tokenizer words (ids 0..249); "<image>" becomes 250
IMAGE_TOKEN_ID = 250
LAYERS = 4


def vocabulary() -> dict:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    while len(vocab) < TOKENS:
        vocab[f"w{len(vocab)}"] = len(vocab)
    return vocab


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>", model_input_names=["input_ids", "attention_mask"])
    out.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return out


def make_llava(path: Path, seed: int = 0) -> Path:
    """Llama (hidden 64, 4 layers, GQA 4/2) + CLIP (28 px / 7, 3 layers) + mlp2x_gelu, random."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, \
        LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=IMG, patch_size=PATCH, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=M)
    model = LlavaForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.get_input_embeddings().weight.normal_(0.0, 0.5, generator=g)
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG}).save_pretrained(str(path))
    return path


def resave_tp2(rank: int, world: int, ckpt: str, out: str, scenes: int) -> list:
    """Load our checkpoint at TP=2 and save its distributed checkpoint in that layout (to ``out``);
    returns the training callback's layer-0 top-k ids of ``scenes`` probe scenes on this TP=2 model."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from nemo_basic.analysis.callback import AlignmentMonitor
    from nemo_basic.convert import ensure_model_parallel
    from nemo_basic.export.hf import load_neva_from_checkpoint

    ensure_model_parallel(2, 1)
    mcore, model = load_neva_from_checkpoint(ckpt)
    mon = AlignmentMonitor(every_n_steps=1, max_steps=1, run_dir=".", scenes=scenes)

    class _Module:  # what the callback reads from the Lightning module
        config, tokenizer, module = model.config, model.tokenizer, mcore

    mon.setup_probe(_Module())
    ids, _ = mon.nearest()
    target = Path(out)
    if rank == 0:
        shutil.copytree(Path(ckpt) / "context", target / "context")
        shutil.copy(Path(ckpt) / "nemo_basic.json", target / "nemo_basic.json")
        (target / "weights").mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(mcore.sharded_state_dict(prefix="module."), str(target / "weights"))
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    return ids.tolist()

