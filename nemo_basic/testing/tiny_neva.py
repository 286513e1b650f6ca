"""The tiny NeMo 2 NeVA (`nemo_basic.models.tiny`) and its synthetic data, set up for the CPU tests
of the NeMo front end: the names the tests use, plus a ready trainer."""
from __future__ import annotations

import torch

from nemo_basic import compat

compat.apply_nemo()  # before any nemo import: torchvision shim + CPU patches

from nemo.collections import vlm  # noqa: E402

from nemo_basic.data import synthetic  # noqa: E402
from nemo_basic.models.tiny import (IMG, PATCH, SEQ, TEXT_LEN, VOCAB, TinyTokenizer, _CPU_FRIENDLY,  # noqa: E402,F401
                                    tiny_language_config, tiny_neva_config, tiny_vision_config)

_collate = synthetic.collate


def SyntheticNevaData(length: int = 1000) -> synthetic.SyntheticNevaData:
    return synthetic.SyntheticNevaData(VOCAB, IMG, TEXT_LEN, length)


def SyntheticNevaDataModule(micro_batch_size: int = 2, global_batch_size: int = 2, seq_length: int = SEQ):
    return synthetic.synthetic_data_module(SyntheticNevaData(), micro_batch_size, global_batch_size, seq_length)


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
