"""The NeMo data module: NeVA batch format, seeded order, resume from consumed samples."""
from __future__ import annotations

import json
import types

import pytest
import torch

from nemo_basic.data.shards import prepare_llava_data

IMG, IGN = -200, -100
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def turns(*values):
    return [{"from": "human" if j % 2 == 0 else "gpt", "value": v} for j, v in enumerate(values)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("dm")
    (root / "images").mkdir()
    records = []
    for i in range(8):
        Image.new("RGB", (30 + i, 20), (10 * i, 100, 200)).save(root / "images" / f"{i}.png")
        records.append({"id": f"img{i}", "image": f"{i}.png", "conversations": turns(
            "<image>\nWhat color is the square?", "blue.", "Is it a circle?", "no.")})
    records.append({"id": "text0", "conversations": turns("What is 2 plus 3?", "5.")})
    records.append({"id": "text1", "conversations": turns("Hello", "hi.")})
    (root / "recs.json").write_text(json.dumps(records))
    prepare_llava_data(root / "recs.json", root / "images", root / "shards", shard_size=4, progress=False)
    return root / "shards"


@pytest.fixture
def single_rank(monkeypatch):
    """Data-parallel rank 0 of 1 without initialising torch.distributed."""
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda *a, **k: 0)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda *a, **k: 1)


def make_dm(prepared, tok, proc, **kw):
    from nemo_basic.data.datamodule import LlavaDataModule

    args = dict(template="vicuna_v1", seq_length=80, num_image_embeddings_per_tile=4, micro_batch_size=2,
                global_batch_size=4, num_workers=0, seed=7, num_train_samples=24)
    args.update(kw)
    dm = LlavaDataModule(str(prepared), tok, proc, **args)
    dm.setup("fit")
    return dm


def batches(dm, n):
    loader = dm.data_sampler.transform_dataloader(dm.train_dataloader())
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def test_batch_format(prepared, tiny_tokenizer, clip_processor, ids_of, single_rank):
    dm = make_dm(prepared, tiny_tokenizer, clip_processor, shuffle=False, micro_batch_size=10, global_batch_size=10,
                 num_train_samples=10)
    (b,) = batches(dm, 1)
    assert set(b) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask", "media", "num_media_tiles",
                      "text_lengths", "sample_ids"}
    assert b["sample_ids"] == [f"img{i}" for i in range(8)] + ["text0", "text1"]
    B, T = b["tokens"].shape
    assert B == 10 and b["tokens"].dtype == torch.long and b["labels"].dtype == torch.long
    assert b["loss_mask"].dtype == torch.float32 and b["loss_mask"].shape == (B, T)
    assert torch.equal(b["position_ids"], torch.arange(T).expand(B, T))
    assert b["attention_mask"] is None
    assert b["media"].shape == (8, 3, 28, 28) and b["media"].dtype == torch.float32
    assert b["num_media_tiles"].dtype == torch.int32 and b["num_media_tiles"].tolist() == [1] * 8
    assert (b["tokens"] == IMG).sum().item() == 8

    # an image sample, by hand: <s> SYSTEM USER: <image> \n-free question ASSISTANT: answer </s> ...
    full = (ids_of("<s>", SYSTEM, "USER:") + [IMG] + ids_of("What color is the square? ASSISTANT:", "blue.", "</s>",
                                                             "USER: Is it a circle? ASSISTANT:", "no.", "</s>"))
    sup_from = {len(ids_of("<s>", SYSTEM, "USER:")) + 1 + len(ids_of("What color is the square? ASSISTANT:")) + k
                for k in range(3)}
    second = len(full) - 3
    sup_from |= {second, second + 1, second + 2}
    want_tokens = full[:-1]
    want_labels = [full[i + 1] if (i + 1) in sup_from else IGN for i in range(len(full) - 1)]
    n = len(want_tokens)
    assert b["text_lengths"][0].item() == n
    assert b["tokens"][0, :n].tolist() == want_tokens
    assert b["labels"][0, :n].tolist() == want_labels
    assert b["loss_mask"][0, :n].tolist() == [1.0 if x != IGN else 0.0 for x in want_labels]
    assert b["tokens"][0, n:].tolist() == [0] * (T - n) and b["labels"][0, n:].tolist() == [IGN] * (T - n)
    assert b["loss_mask"][0, n:].sum().item() == 0

    # a text-only sample: no placeholder, no image, answer "5 ." + </s> supervised
    full = ids_of("<s>", SYSTEM, "USER: What is 2 plus 3? ASSISTANT:", "5.", "</s>")
    n = len(full) - 1
    assert b["tokens"][8, :n].tolist() == full[:-1]
    assert b["labels"][8, :n].tolist() == [IGN] * (n - 3) + full[-3:]
    assert b["text_lengths"][8].item() == n


def test_pad_to_seq_length_for_pipeline_parallelism(prepared, tiny_tokenizer, clip_processor, single_rank):
    dm = make_dm(prepared, tiny_tokenizer, clip_processor, pad_to_seq_length=True)
    (b,) = batches(dm, 1)
    assert b["tokens"].shape == (2, 80) and b["labels"].shape == (2, 80) and b["position_ids"].shape == (2, 80)


def test_truncation_keeps_combined_length_within_seq_length(prepared, tiny_tokenizer, clip_processor, single_rank):
    seq, m = 40, 4
    dm = make_dm(prepared, tiny_tokenizer, clip_processor, seq_length=seq, shuffle=False, micro_batch_size=10,
                 global_batch_size=10, num_train_samples=10)
    (b,) = batches(dm, 1)
    images_per_row = (b["tokens"] == IMG).sum(dim=1)
    combined = b["text_lengths"] + images_per_row * (m - 1)
    assert combined.max().item() <= seq
    assert combined[0].item() == seq  # the long image samples were cut to exactly seq_length
    assert b["media"].shape[0] == int(images_per_row.sum())


def test_seeded_shuffle_is_deterministic(prepared, tiny_tokenizer, clip_processor, single_rank):
    order = lambda dm: [i for b in batches(dm, 5) for i in b["sample_ids"]]  # noqa: E731
    a = order(make_dm(prepared, tiny_tokenizer, clip_processor, seed=7))
    b = order(make_dm(prepared, tiny_tokenizer, clip_processor, seed=7))
    c = order(make_dm(prepared, tiny_tokenizer, clip_processor, seed=8))
    assert a == b
    assert a != c
    assert sorted(a) == sorted([f"img{i}" for i in range(8)] + ["text0", "text1"])  # epoch 1 = each record once
    unshuffled = order(make_dm(prepared, tiny_tokenizer, clip_processor, shuffle=False))
    assert unshuffled == [f"img{i}" for i in range(8)] + ["text0", "text1"]


def test_resume_gives_the_same_next_batches(prepared, tiny_tokenizer, clip_processor, single_rank, monkeypatch):
    from megatron.core import num_microbatches_calculator as nmc
    from nemo.lightning.pytorch.plugins import MegatronDataSampler
    from nemo.lightning.pytorch.strategies import MegatronStrategy
    from nemo.utils import AppState

    full = batches(make_dm(prepared, tiny_tokenizer, clip_processor), 12)  # 24 samples = 2.4 epochs

    # the checkpointed position after 3 optimizer steps of 4 samples (2 micro-batches of 2, DP = 1)
    dm = make_dm(prepared, tiny_tokenizer, clip_processor)
    monkeypatch.setattr(MegatronDataSampler, "num_microbatches", property(lambda self: 2))
    monkeypatch.setattr(AppState(), "_data_parallel_size", 1)
    trainer = types.SimpleNamespace(strategy=object.__new__(MegatronStrategy), global_step=3, max_steps=-1)
    dm.trainer = trainer
    dm.data_sampler.connect(trainer)
    state = dm.state_dict()
    assert state == {"consumed_samples": 12}

    monkeypatch.setattr(nmc, "_GLOBAL_NUM_MICROBATCHES_CALCULATOR", None)
    resumed = make_dm(prepared, tiny_tokenizer, clip_processor)
    resumed.load_state_dict(state)
    after = batches(resumed, 6)
    assert len(after) == 6
    for x, y in zip(after, full[6:]):
        assert x["sample_ids"] == y["sample_ids"]
        for k in ("tokens", "labels", "loss_mask", "media"):
            assert torch.equal(x[k], y[k]), k
