"""Stage 1 (alignment) training entry point.

PLACEHOLDER until the recipes issue lands: with no arguments it trains the tiny NeVA model on
synthetic data for a few steps through NeMo 2's real training loop (MegatronStrategy on CPU or
GPU) and prints the loss at the start and the end. The real recipe (SmolLM2-135M + DINOv2-small on
the embedded data, BASIC on, YAML configs from conf/) replaces this body.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "nemo_basic_tiny"))
    args = parser.parse_args()

    import torch

    from nemo_basic import compat

    compat.apply_nemo()
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm, vlm

    from nemo_basic.testing import tiny_neva

    model = vlm.NevaModel(tiny_neva.tiny_neva_config(), tokenizer=tiny_neva.TinyTokenizer(),
                          optim=nl.MegatronOptimizerModule(OptimizerConfig(
                              optimizer="adam", lr=1e-3, bf16=False, fp16=False, params_dtype=torch.float32)))
    trainer = nl.Trainer(accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1,
                         max_steps=args.steps, strategy=nl.MegatronStrategy(ckpt_async_save=False),
                         plugins=nl.MegatronMixedPrecision(precision="32"), log_every_n_steps=1,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False)
    logger = nl.NeMoLogger(log_dir=args.log_dir, name="tiny", use_datetime_version=False,
                           ckpt=nl.ModelCheckpoint(save_last=True, every_n_train_steps=args.steps))
    losses = []

    class _Record(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_batch_end(self, trainer, *_):
            losses.append(float(trainer.callback_metrics["reduced_train_loss"]))

    trainer.callbacks.append(_Record())
    start = time.time()
    llm.train(model, tiny_neva.SyntheticNevaDataModule(), trainer, log=logger,
              resume=nl.AutoResume(resume_if_exists=True, resume_ignore_no_checkpoint=True))
    if losses:
        print(f"[basic_pretrain] {len(losses)} steps in {time.time() - start:.1f}s; "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; checkpoints in {args.log_dir}/tiny/checkpoints")
    else:
        print(f"[basic_pretrain] nothing to do: resumed at step {trainer.global_step} >= {args.steps}")


if __name__ == "__main__":
    main()
