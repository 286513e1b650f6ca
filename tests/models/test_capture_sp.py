"""The target of eq. 4 under sequence parallelism (TP = 2): the capture's layer hook, fed the
S/TP shards Megatron's SP decoder hands each rank, moves one [B, W, h] set of image rows per
micro-batch between the ranks (not the whole [S, B, h] hidden state in every layer 1..k), and
the target equals the single-process one (float64 reference)."""
import pytest
import torch

import capture_workers as CW


def _reference_target(states, image_mask, width, k):
    """Σ_l w_l·h_l at each sample's image positions (in order), w_l = l² / Σ l², float64."""
    weights = [l * l / sum(j * j for j in range(1, k + 1)) for l in range(1, k + 1)]
    batch, hidden = image_mask.shape[0], states[0].shape[-1]
    out = torch.zeros(batch, width, hidden, dtype=torch.float64)
    for b in range(batch):
        positions = [p for p in range(image_mask.shape[1]) if image_mask[b, p]]
        for j, p in enumerate(positions):
            out[b, j] = sum(w * states[l][p, b].double() for l, w in enumerate(weights))
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_sequence_parallel_target_moves_only_image_rows_once(spawn, k):
    ranks = spawn(CW.sp_target, 2, k)
    for r in ranks:
        assert r["tp"] == 2
        batch, width, hidden = r["target"].shape
        image_rows_bytes = batch * width * hidden * 4  # the fp32 target: the image rows, once
        seq_hidden_bytes = r["image_mask"].shape[1] * batch * hidden * r["target"].element_size()
        moved = sum(nbytes for _, nbytes in r["collectives"])
        gathered = sum(nbytes for name, nbytes in r["collectives"] if "gather" in name)
        assert moved <= image_rows_bytes, (r["collectives"], image_rows_bytes)
        assert gathered == 0, r["collectives"]
        assert image_rows_bytes < seq_hidden_bytes  # the bound is below one layer's all-gather
        want = _reference_target(r["states"], r["image_mask"], r["width"], k)
        torch.testing.assert_close(r["target"].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(ranks[0]["target"], ranks[1]["target"])
    assert ranks[0]["das"].item() == ranks[1]["das"].item() > 0


def test_target_is_summed_into_one_buffer(spawn):
    """Eq. 4's running sum is added in place: one fp32 [B, W, h] buffer per micro-batch, not a
    fresh one per layer; still the float64 reference's value."""
    (r,) = spawn(CW.target_in_place, 1, 3)
    assert len(set(r["pointers"])) == 1, r["pointers"]
    want = _reference_target(r["states"], r["image_mask"], r["width"], 3)
    torch.testing.assert_close(r["target"].double(), want, rtol=1e-6, atol=1e-6)


def test_a_received_sum_is_detached_once_then_added_in_place():
    """On a pipeline stage that continues the sum (pipeline.unpack: a tensor in the received
    activation's graph), the first addition makes a buffer of its own, later ones reuse it."""
    from nemo_basic.models.capture import _accumulate

    received = torch.randn(2, 3, 4, requires_grad=True)
    total = received * 1.0  # as unpack returns it: in the graph of the received tensor
    rows = [torch.randn(2, 3, 4, dtype=torch.bfloat16) for _ in range(3)]
    first = _accumulate(total, rows[0], 0.25)
    assert not first.requires_grad
    second = _accumulate(first, rows[1], 0.5)
    third = _accumulate(second, rows[2], 2.0)
    assert second is first and third is first
    want = received.detach().double() + sum(w * r.double() for w, r in zip((0.25, 0.5, 2.0), rows))
    torch.testing.assert_close(third.double(), want, rtol=1e-6, atol=1e-6)
