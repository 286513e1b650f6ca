"""Rank functions for the NeMo 2 front-end tests (each runs in fresh spawned processes)."""
from __future__ import annotations

import torch


def build(tp: int, pp: int, max_steps: int):
    from nemo_basic.testing import tiny_neva

    return tiny_neva.tiny_trainer_and_model(tp, pp, max_steps)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


class LossRecorder:
    """Lightning callback keeping the reduced training loss of every step."""

    def __new__(cls):
        import lightning.pytorch as pl

        class _Recorder(pl.Callback):
            def __init__(self):
                self.losses = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                loss = trainer.callback_metrics.get("reduced_train_loss")
                if loss is not None:
                    self.losses.append(float(loss))

        return _Recorder()


def train(rank: int, world: int, tp: int, pp: int, steps: int, log_dir: str, seed: int = 1234) -> dict:
    """Train the tiny NeVA with NeMo's own loop (llm.train): NeMoLogger + ModelCheckpoint saving a
    Megatron distributed checkpoint at the end, AutoResume picking up the last one if present."""
    from nemo import lightning as nl
    from nemo.collections import llm

    from nemo_basic.testing import tiny_neva

    torch.manual_seed(seed)
    trainer, model = build(tp, pp, steps)
    recorder = LossRecorder()
    trainer.callbacks.append(recorder)
    checkpoint = nl.ModelCheckpoint(save_last=True, every_n_train_steps=steps, save_top_k=1,
                                    monitor="reduced_train_loss", save_optim_on_train_end=True)
    logger = nl.NeMoLogger(log_dir=log_dir, name="tiny", use_datetime_version=False, ckpt=checkpoint)
    resume = nl.AutoResume(resume_if_exists=True, resume_ignore_no_checkpoint=True)
    llm.train(model, tiny_neva.SyntheticNevaDataModule(), trainer, log=logger, resume=resume)
    return {"step": trainer.global_step, "losses": recorder.losses, "weights": weights(model)}


def configure_classes(rank: int, world: int) -> list:
    """The module classes NeVA's configure_model builds for our config and for NeVA's own."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from nemo_basic.models.neva import BasicNevaConfig
    from nemo_basic.testing import tiny_neva

    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1)
    ours = tiny_neva.tiny_neva_config(BasicNevaConfig).configure_model(tiny_neva.TinyTokenizer())
    theirs = tiny_neva.tiny_neva_config().configure_model(tiny_neva.TinyTokenizer())
    return [type(ours).__name__, type(theirs).__name__]
