"""A tiny NeMo 2 NeVA model and synthetic data module, for the CPU tests of the NeMo front end.

Same shapes as `nemo_basic.testing.tiny` (ViT 16×16/4 → MLP projector → 4-layer GPT, vocab 1024),
built through NeMo's own config classes so that `nemo.lightning` trains it.
"""
from __future__ import annotations

import torch

from nemo_basic import compat

compat.apply_nemo()  # before any nemo import: torchvision shim + CPU patches

import lightning.pytorch as pl  # noqa: E402
from nemo.collections import llm, vlm  # noqa: E402
from nemo.collections.vlm.vision.base import CLIPViTConfig, MultimodalProjectorConfig  # noqa: E402
from nemo.lightning.pytorch.plugins import MegatronDataSampler  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from nemo_basic.models.specs import language_layer_spec, vision_layer_spec  # noqa: E402
from nemo_basic.testing.tiny import IMG, PATCH, VOCAB  # noqa: E402

TEXT_LEN = 20
SEQ = 64

_CPU_FRIENDLY = dict(
    # on the CPU backend only: TE builds FP8 primary weights (fp8_param) by quantising on the GPU
    use_cpu_initialization=compat.cpu_backend_needed(), params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
    bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
    bias_dropout_fusion=False, gradient_accumulation_fusion=False,
)


def _language_fusions() -> dict:
    """On a GPU, the LLM's kernel fusions that this machine's kernels allow (nemo_basic.compat.kernels),
    so the GPU self-test's tiny runs train with them; on the CPU backend, the flags above."""
    if compat.cpu_backend_needed():
        return dict(_CPU_FRIENDLY, apply_rope_fusion=False)
    from nemo_basic.compat import kernels

    # What the local spec accepts (the self-test builds this model with the local spec, and with the
    # TE spec where TE imports), plus TE's rope kernel, which both specs call where it imports.
    flags = kernels.fusion_flags(gpu_backend=True, transformer_engine=False,
                                 torch_compile=kernels.torch_compile_can_build())
    # gradient-accumulation fusion writes into Megatron DDP's `main_grad`, which the test-suite's
    # and the self-test's plain forward/backward calls do not create
    flags.update(apply_rope_fusion=kernels.have_transformer_engine(), gradient_accumulation_fusion=False)
    return dict(_CPU_FRIENDLY, **flags)


def tiny_language_config(num_layers: int = 4, init_method_std: float = 0.02) -> llm.GPTConfig:
    return llm.GPTConfig(num_layers=num_layers, init_method_std=init_method_std, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                         seq_length=SEQ, vocab_size=VOCAB, make_vocab_size_divisible_by=128,
                         position_embedding_type="rope", share_embeddings_and_output_weights=False,
                         transformer_layer_spec=language_layer_spec(), **_language_fusions())


def tiny_vision_config() -> CLIPViTConfig:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = CLIPViTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                        kv_channels=16, num_query_groups=2, img_h=IMG, img_w=IMG, patch_dim=PATCH,
                        ln_pre_impl=WrappedTorchNorm, ln_post_impl=WrappedTorchNorm,
                        transformer_layer_spec=vision_layer_spec(), **_CPU_FRIENDLY)
    # Upstream: CLIPViTConfig.__post_init__ overrides TransformerConfig.__post_init__ without
    # calling it, so init_method and friends stay unset; run the base initialiser as well.
    TransformerConfig.__post_init__(cfg)
    return cfg


def tiny_neva_config(config_cls=None, num_layers: int = 4, init_method_std: float = 0.02, **kwargs):
    config_cls = config_cls or vlm.NevaConfig
    projector = MultimodalProjectorConfig(projector_type="mlp2x_gelu", input_size=32, hidden_size=64,
                                          ffn_hidden_size=64)
    kwargs = dict(dict(vision_feature_layer=-1, freeze_language_model=False, freeze_vision_model=False,
                       batch_p2p_sync=False), **kwargs)
    return config_cls(language_transformer_config=tiny_language_config(num_layers, init_method_std),
                      vision_transformer_config=tiny_vision_config(), vision_projection_config=projector,
                      **kwargs)


class TinyTokenizer:
    """NevaModel only stores the tokenizer and reads its vocabulary size."""

    vocab_size = VOCAB


class SyntheticNevaData(Dataset):
    """Deterministic random samples in NeVA's batch format, one image placeholder each."""

    def __init__(self, length: int = 1000):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(1, VOCAB, (TEXT_LEN + 1,), generator=g)
        tokens[2] = -200
        return {"media": torch.randn(3, IMG, IMG, generator=g), "tokens": tokens[:-1],
                "labels": tokens[1:].clone(), "loss_mask": torch.ones(TEXT_LEN),
                "position_ids": torch.arange(TEXT_LEN)}


def _collate(samples):
    batch = torch.utils.data.default_collate(samples)
    batch["attention_mask"] = None
    batch["num_media_tiles"] = torch.ones(len(samples), dtype=torch.int)
    return batch


class SyntheticNevaDataModule(pl.LightningDataModule):
    def __init__(self, micro_batch_size: int = 2, global_batch_size: int = 2, seq_length: int = SEQ):
        super().__init__()
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.seq_length = seq_length
        self.data_sampler = MegatronDataSampler(seq_len=seq_length, micro_batch_size=micro_batch_size,
                                                global_batch_size=global_batch_size)

    def train_dataloader(self):
        # MegatronStrategy wraps this loader with a Megatron batch sampler (micro-batch sized).
        return DataLoader(SyntheticNevaData(), batch_size=self.micro_batch_size, collate_fn=_collate)


def tiny_trainer_and_model(tp: int = 1, pp: int = 1, max_steps: int = 3, model_cls=None, config=None, lr=1e-3):
    """A CPU `nl.Trainer` (MegatronStrategy, fp32) and a tiny NeVA LightningModule (NeVA's own
    class unless `model_cls`/`config` say otherwise), as the NeMo front-end tests use them."""
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl

    model_cls = model_cls or vlm.NevaModel
    config = config or tiny_neva_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if pp > 1:
        config.language_transformer_config.pipeline_dtype = config.pipeline_dtype = torch.float32
    model = model_cls(config, tokenizer=TinyTokenizer(), optim=nl.MegatronOptimizerModule(OptimizerConfig(
        optimizer="adam", lr=lr, bf16=False, fp16=False, params_dtype=torch.float32,
        use_distributed_optimizer=False, clip_grad=1.0)))
    strategy = nl.MegatronStrategy(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   pipeline_dtype=torch.float32 if pp > 1 else None, ckpt_async_save=False)
    trainer = nl.Trainer(accelerator="cpu", devices=tp * pp, max_steps=max_steps, strategy=strategy,
                         plugins=nl.MegatronMixedPrecision(precision="32"), log_every_n_steps=1,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                         logger=False, enable_progress_bar=False)
    return trainer, model
