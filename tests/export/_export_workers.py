"""Tiny random Hugging Face models for the export tests, and the rank functions they spawn."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import nemo_basic  # noqa: F401  (CPU backend first)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 256               # HF text vocabulary (embedding rows)
TOKENS = 250              # words in the tiny tokenizer (ids 0..249); "<image>" becomes 250 in LLaVA dirs
IMAGE_TOKEN_ID = 250
IMG, PATCH = 28, 7        # CLIP: 4 x 4 = 16 patches + class token
M = (IMG // PATCH) ** 2


def tiny_tokenizer(n: int = TOKENS, image_token: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, n)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>", model_input_names=["input_ids", "attention_mask"])
    if image_token:
        out.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return out


def llama_config(tied: bool = False, layers: int = 3, vocab: int = VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def clip_config(layers: int = 3):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                            image_size=IMG, patch_size=PATCH, projection_dim=32)


def dinov2_config(layers: int = 3):
    from transformers import Dinov2Config

    # pre-training size 56 px; the processor crops 28 px, so HF interpolates the position embeddings
    return Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, mlp_ratio=2,
                        image_size=56, patch_size=PATCH)


def siglip_config(layers: int = 3):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                              image_size=IMG, patch_size=PATCH)


def siglip_processor(size: int = IMG):
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": size, "width": size})


def clip_processor(size: int = IMG):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def dinov2_processor(size: int = IMG):
    from transformers import BitImageProcessor

    return BitImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                             do_center_crop=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """HF initialises norms to ones: perturb them so a dropped norm cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def make_llava(path: Path, seed: int = 0) -> Path:
    """Tiny HF LLaVA: Llama (GQA 4/2, hidden 64, 4 layers, untied) + CLIP (28 px / 7) + mlp2x_gelu."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=clip_config().to_dict(), text_config=llama_config(layers=4).to_dict(),
                      image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=M)
    model = LlavaForConditionalGeneration(cfg)
    _randomise_norms(model, seed)
    with torch.no_grad():  # a wider embedding table: token distributions V Eᵀ far from uniform (L_sds)
        model.get_input_embeddings().weight.normal_(0.0, 0.5)
    model.save_pretrained(str(path))
    tiny_tokenizer(image_token=True).save_pretrained(str(path))
    clip_processor().save_pretrained(str(path))
    assert isinstance(cfg.text_config, LlamaConfig)
    return path


def make_llm(path: Path, tied: bool, seed: int = 1) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = TOKENS if tied else VOCAB  # tied: embedding rows == tokenizer size (the image token needs a new row)
    model = LlamaForCausalLM(llama_config(tied=tied, vocab=vocab, layers=4))
    _randomise_norms(model, seed)
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


def make_vision(path: Path, kind: str, seed: int = 2) -> Path:
    from transformers import CLIPVisionModel, Dinov2Model, SiglipVisionModel

    torch.manual_seed(seed)
    if kind == "clip":
        model, proc = CLIPVisionModel(clip_config()), clip_processor()
    elif kind == "siglip":
        model, proc = SiglipVisionModel(siglip_config()), siglip_processor()
    else:
        model, proc = Dinov2Model(dinov2_config()), dinov2_processor()
    _randomise_norms(model, seed)
    model.save_pretrained(str(path))
    proc.save_pretrained(str(path))
    return path


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m nemo_basic.export ...`` in a fresh interpreter (checked)."""
    # the repo in front of whatever the path already has (a wheel kit's site on the GPU machine's stack)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-m", "nemo_basic.export", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"CLI {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def neva_inputs(batch: int = 2, pre: int = 3, post: int = 5, seed: int = 0):
    """The same image + text in both conventions: HF LLaVA (m image tokens) and NeVA (one -200)."""
    g = torch.Generator().manual_seed(seed)
    ids_pre = torch.randint(3, TOKENS, (batch, pre), generator=g)
    ids_post = torch.randint(3, TOKENS, (batch, post), generator=g)
    hf_ids = torch.cat([ids_pre, torch.full((batch, M), IMAGE_TOKEN_ID), ids_post], 1)
    neva_ids = torch.cat([ids_pre, torch.full((batch, 1), -200), ids_post], 1)
    pixels = torch.randn(batch, 3, IMG, IMG, generator=g)
    return hf_ids, neva_ids, pixels


def neva_forward(mcore, neva_ids, pixels, labels=None):
    b, t = neva_ids.shape
    kw = {}
    if labels is not None:
        kw = dict(labels=labels, loss_mask=torch.ones(b, t))
    return mcore(input_ids=neva_ids, position_ids=torch.arange(t)[None].expand(b, -1), images=pixels,
                 num_image_tiles=torch.ones(pixels.shape[0], dtype=torch.int), **kw)


def text_ids(batch: int = 2, length: int = 12, seed: int = 5):
    return torch.randint(3, TOKENS, (batch, length), generator=torch.Generator().manual_seed(seed))


def stage1_from_parts(llm_dir: str, clip_dir: str, tp: int, pp: int) -> dict:
    """basic_neva_config_from_hf + load_hf_weights on this rank; TP: gathered LM logits on text."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_basic.models.builder import basic_neva_config_from_hf, load_hf_weights, tokenizer_from_hf

    config = basic_neva_config_from_hf(llm_dir, clip_dir, seq_length=128, tensor_model_parallel_size=tp,
                                       pipeline_model_parallel_size=pp)
    model = config.configure_model(tokenizer_from_hf(llm_dir)).eval()
    load_hf_weights(model, llm_dir)
    out = {"lm_state": {k: v.clone() for k, v in model.language_model.state_dict().items()
                        if not k.endswith("_extra_state")}}
    if pp == 1:
        ids = text_ids()
        with torch.no_grad():
            logits = model.language_model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None].expand(2, -1),
                                          attention_mask=None)
        out["logits"] = gather_from_tensor_model_parallel_region(logits.contiguous())
    return out


# -- spawned: load our checkpoint at TP=2 and at PP=2, forward, re-save in that layout ---------------
def parallel_load_and_save(rank: int, world: int, ckpt: str, out_root: str, llm_dir: str, clip_dir: str) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_basic.convert import ensure_model_parallel
    from nemo_basic.export.hf import load_neva_from_checkpoint

    result = {}
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        ensure_model_parallel(tp, pp)
        mcore, _ = load_neva_from_checkpoint(ckpt)
        mcore.eval()
        entry = {"layers": [layer.layer_number for layer in mcore.language_model.decoder.layers]}
        if pp == 1:
            _, neva_ids, pixels = neva_inputs()
            with torch.no_grad():
                logits = neva_forward(mcore, neva_ids, pixels)
            entry["logits"] = gather_from_tensor_model_parallel_region(logits.contiguous())
        entry["state"] = {k: v.clone() for k, v in mcore.state_dict().items() if not k.endswith("_extra_state")}
        entry["from_hf"] = stage1_from_parts(llm_dir, clip_dir, tp, pp)
        target = Path(out_root) / name
        if rank == 0:
            shutil.copytree(Path(ckpt) / "context", target / "context")
            shutil.copy(Path(ckpt) / "nemo_basic.json", target / "nemo_basic.json")
            (target / "weights").mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save(mcore.sharded_state_dict(prefix="module."), str(target / "weights"))
        torch.distributed.barrier()
        result[name] = entry
        ps.destroy_model_parallel()
    return result


# -- spawned: NeMo's own trainer restores our checkpoint (at TP=2) ---------------------------------
class _Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(3, TOKENS, (21,), generator=g)
        tokens[2] = -200
        return {"media": torch.randn(3, IMG, IMG, generator=g), "tokens": tokens[:-1], "labels": tokens[1:].clone(),
                "loss_mask": torch.ones(20), "position_ids": torch.arange(20)}


def _collate(samples):
    batch = torch.utils.data.default_collate(samples)
    batch["attention_mask"] = None
    batch["num_media_tiles"] = torch.ones(len(samples), dtype=torch.int)
    return batch


def nemo_restore(rank: int, world: int, ckpt: str, log_dir: str) -> dict:
    """One NeMo training step at lr 0 that starts from our checkpoint via AutoResume/RestoreConfig."""
    import lightning.pytorch as pl
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.lightning.pytorch.plugins import MegatronDataSampler

    from nemo_basic.export.checkpoint import load_checkpoint_context
    from nemo_basic.models.neva import BasicNevaModel

    class Data(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.seq_length, self.micro_batch_size, self.global_batch_size = 128, 2, 2
            self.data_sampler = MegatronDataSampler(seq_len=128, micro_batch_size=2, global_batch_size=2)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_Samples(), batch_size=2, collate_fn=_collate)

    context = load_checkpoint_context(ckpt)
    config = context.config
    config.tensor_model_parallel_size = world
    model = BasicNevaModel(config, tokenizer=context.tokenizer, optim=nl.MegatronOptimizerModule(OptimizerConfig(
        optimizer="adam", lr=0.0, weight_decay=0.0, bf16=False, fp16=False, params_dtype=torch.float32,
        use_distributed_optimizer=False)))
    trainer = nl.Trainer(accelerator="cpu", devices=world, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
                         strategy=nl.MegatronStrategy(tensor_model_parallel_size=world, ckpt_async_save=False),
                         plugins=nl.MegatronMixedPrecision(precision="32"))
    resume = nl.AutoResume(restore_config=nl.RestoreConfig(path=ckpt, load_model_state=True, load_optim_state=False))
    logger = nl.NeMoLogger(log_dir=log_dir, name="restore", use_datetime_version=False)
    llm.train(model, Data(), trainer, log=logger, resume=resume)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)
             and not k.endswith("_extra_state")}
    return {"state": state, "step": trainer.global_step}
