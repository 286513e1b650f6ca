"""Synthetic NeVA batches for the tiny model (``model.type: tiny``, ``data.path: [synthetic]``).

Sample i is drawn from its own generator (seed i): random tokens with one image placeholder at
position 2, a random image, every label trained. The data module keeps its position in the
checkpoints (consumed samples), as `nemo_basic.data.datamodule.LlavaDataModule` does, so that a
resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

IMAGE_PLACEHOLDER = -200  # NeVA's image token index


class SyntheticNevaData(Dataset):
    """Deterministic random samples in NeVA's batch format, one image placeholder each."""

    def __init__(self, vocab: int, image_size: int, text_len: int, length: int = 1000):
        self.vocab, self.image_size, self.text_len, self.length = vocab, image_size, text_len, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(1, self.vocab, (self.text_len + 1,), generator=g)
        tokens[2] = IMAGE_PLACEHOLDER
        return {"media": torch.randn(3, self.image_size, self.image_size, generator=g), "tokens": tokens[:-1],
                "labels": tokens[1:].clone(), "loss_mask": torch.ones(self.text_len),
                "position_ids": torch.arange(self.text_len)}


def collate(samples):
    batch = torch.utils.data.default_collate(samples)
    batch["attention_mask"] = None
    batch["num_media_tiles"] = torch.ones(len(samples), dtype=torch.int)
    return batch


def synthetic_data_module(dataset: SyntheticNevaData, micro_batch_size: int, global_batch_size: int,
                          seq_length: int):
    """A Lightning data module over `dataset` whose position is saved in checkpoints and restored."""
    import lightning.pytorch as pl
    from nemo.lightning.data import WrappedDataLoader
    from nemo.lightning.pytorch.plugins import MegatronDataSampler

    class SyntheticNevaDataModule(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.micro_batch_size, self.global_batch_size, self.seq_length = (
                micro_batch_size, global_batch_size, seq_length)
            self.data_sampler = MegatronDataSampler(seq_len=seq_length, micro_batch_size=micro_batch_size,
                                                    global_batch_size=global_batch_size)
            self.init_global_step = 0

        def train_dataloader(self):
            # MegatronStrategy wraps this loader with a Megatron batch sampler (micro-batch sized).
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                self.init_global_step = trainer.global_step
                self.data_sampler.init_global_step = self.init_global_step
            return WrappedDataLoader(mode="train", dataset=dataset, batch_size=self.micro_batch_size,
                                     collate_fn=collate)

        def state_dict(self):
            consumed = self.data_sampler.compute_consumed_samples(self.trainer.global_step - self.init_global_step)
            return {"consumed_samples": consumed}

        def load_state_dict(self, state_dict):
            from megatron.core import num_microbatches_calculator as nmc

            consumed = int(state_dict["consumed_samples"])
            self.data_sampler.init_consumed_samples = consumed
            self.data_sampler.prev_consumed_samples = consumed
            self.data_sampler.if_first_step = 1
            if nmc._GLOBAL_NUM_MICROBATCHES_CALCULATOR is not None:
                nmc._GLOBAL_NUM_MICROBATCHES_CALCULATOR.update(consumed_samples=consumed, consistency_check=False)

    return SyntheticNevaDataModule()
