"""Host synchronisations of a training micro-batch (data step + forward + backward), counted on
every pipeline stage with blocking host→device copies included (the data step's batch is bound
for a stand-in device, so the counter sees them): BASIC adds exactly one per micro-batch (the row
counts RowLayout reads) on a stage holding a layer ≤ k, none on the others, and with BASIC off
the micro-batch costs what plain NeVA's does."""
import pytest

import capture_workers as CW
from basic_workers import MICRO_BATCHES


@pytest.mark.parametrize("pp,k", [(1, 2), (2, 2), (2, 3)], ids=["pp1", "pp2-k-on-stage0", "pp2-k-spans-stages"])
def test_basic_adds_one_host_sync_per_micro_batch_on_every_stage(spawn, pp, k):
    ranks = spawn(CW.training_syncs, pp, pp, k)
    for r in ranks:
        supervising = r["stage"] == 0 or k > 2  # 4 layers over 2 stages: layers 3, 4 on stage 1
        plain, off, on = (r[v]["counts"] for v in ("plain", "off", "on"))
        assert off == plain, r                               # BASIC off costs exactly NeVA's syncs
        added = {name: on.get(name, 0) - off.get(name, 0) for name in set(on) | set(off)}
        expected = {"tolist": MICRO_BATCHES} if supervising else {}
        assert {name: n for name, n in added.items() if n} == expected, (r["stage"], added, r)
        assert on.get("h2d_copy", 0) == 0, r                 # no blocking host→device copy
    last = ranks[-1] if k > 2 else ranks[0]
    assert last["on"]["logged"] == MICRO_BATCHES  # the losses were computed: the capture was live


def test_counter_sees_blocking_copies_of_host_tensors():
    """A CPU tensor copied to another device (meta stands in for CUDA) without non_blocking is a
    sync (CUDA copies it and synchronises the stream); non-blocking or host-to-host copies are not."""
    import torch

    from nemo_basic.testing.syncs import count_host_syncs

    x = torch.arange(6)
    on_device = torch.empty(6, dtype=torch.long, device="meta")
    with count_host_syncs() as counter:
        x.to("meta")
        x.to("meta", torch.float32)
        on_device.copy_(x)
    assert dict(counter.counts) == {"h2d_copy": 3}
    with count_host_syncs() as counter:
        x.to("meta", non_blocking=True)
        on_device.copy_(x, non_blocking=True)
        x.to(torch.float64)
        x.clone().copy_(x)
        on_device.to("meta", torch.float32)  # device to device
    assert dict(counter.counts) == {}
