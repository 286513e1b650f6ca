"""Rank functions for the issue-25 capture tests (host syncs of a training micro-batch, the
sequence-parallel target's collectives, where the lse kernel runs); spawned gloo processes."""
from __future__ import annotations

import contextlib

import torch

import basic_workers as W
from nemo_basic.models.basic_config import BasicConfig


def lse_kernel_calls(rank, world) -> dict:
    """Calls of the lse kernel in one forward (+ backward) per (degree, batch kind, recompute)."""
    from megatron.core import parallel_state as ps

    from nemo_basic.models import capture as C

    real = C.sdpa_with_lse
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    out = {}
    C.sdpa_with_lse = counting
    try:
        for degree, kind, recompute in [("attention", "mixed", None), ("attention", "textonly", None),
                                        ("equal", "mixed", None), ("equal", "textonly", None),
                                        ("attention", "textonly", "selective"), ("equal", "mixed", "selective")]:
            model = W.build(BasicConfig(layers=2, degree=degree), micro_batch_size=3, recompute=recompute)
            b = W.mixed_batch(7) if kind == "mixed" else W.text_only_batch(9)
            calls[0] = 0
            if recompute:  # count the first forward only (the recompute runs in backward)
                with torch.no_grad():
                    W._call(model, b)
            else:
                per_token, mask = W._call(model, b)
                W.tiny.lm_loss(per_token, mask).backward()
            out[degree, kind, recompute] = calls[0]
            ps.destroy_model_parallel()
    finally:
        C.sdpa_with_lse = real
    return out


# -- host synchronisations of a training micro-batch (data step + forward + backward) -------------

@contextlib.contextmanager
def _batch_device_is_meta():
    """The data step's `.cuda()` lands on `meta`: a stand-in non-CPU device, so that the sync
    counter sees its host→device copies on a CPU machine (blocking or not) as CUDA would have them."""
    original = torch.Tensor.cuda

    def cuda(self, device=None, non_blocking=False, **kwargs):
        return self.to("meta", non_blocking=non_blocking)

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _raw_batch(b) -> dict:
    """The micro-batch as the data module yields it (nemo_basic.data.datamodule)."""
    batch, tokens = b.input_ids.shape
    return {"tokens": b.input_ids, "labels": b.labels, "loss_mask": b.loss_mask, "attention_mask": None,
            "position_ids": torch.arange(tokens).expand(batch, tokens).contiguous(), "media": b.images,
            "num_media_tiles": b.num_image_tiles, "text_lengths": b.text_lengths}


def training_syncs(rank, world, pp: int, k: int) -> dict:
    """Host syncs of one training step of 2 micro-batches through Megatron's schedule, on this
    pipeline stage, for plain NeVA (its own data step), BASIC off and BASIC on (our data step).
    Each micro-batch runs the model's data step on a batch bound for a stand-in device (meta),
    then the forward and backward on the CPU batch."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from nemo.collections.vlm.neva.model.base import neva_data_step

    from nemo_basic.models.neva import basic_neva_data_step
    from nemo_basic.testing.syncs import count_host_syncs

    out = {}
    for variant in ("plain", "off", "on"):
        basic = None if variant == "plain" else BasicConfig(enabled=variant == "on", layers=k)
        model = W.build(basic, pp=pp, num_layers=4, micro_batch_size=3, plain=variant == "plain")
        data_step = neva_data_step if variant == "plain" else basic_neva_data_step

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            with _batch_device_is_meta():
                data_step(iter([_raw_batch(b)]))
            per_token, mask = W._call(model, b)

            def loss_func(output_tensor):
                loss = W.tiny.lm_loss(output_tensor, mask)
                return loss, {"lm loss": loss.detach()}
            return per_token, loss_func

        seq = model.pipeline_seq_length() if hasattr(model, "pipeline_seq_length") else model._language_max_sequence_length

        def step():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(W.batches("mixed")), model=[model],
                num_microbatches=W.MICRO_BATCHES, seq_length=seq, micro_batch_size=3, forward_only=False)

        step()  # warm-up: one-time work (kernel probes) is not per micro-batch
        capture = getattr(model, "capture", None)
        if capture is not None:
            capture.logs.clear()
        with count_host_syncs() as counter:
            step()
        out[variant] = {"counts": dict(counter.counts), "logged": len(capture.logs) if capture is not None else 0}
        ps.destroy_model_parallel()
    out["stage"] = rank if pp > 1 else 0
    return out


# -- the target under sequence parallelism: the capture's layer hook fed S/TP shards ---------------

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor",
                "_reduce_scatter_base", "broadcast", "all_to_all_single", "all_gather_object")


@contextlib.contextmanager
def _collective_bytes():
    """[(collective, bytes)] of every torch.distributed collective called inside (Megatron's
    mappings bind their all-gather at import: that name is counted too). For an all-gather the
    bytes of the gathered result, otherwise of the tensor sent."""
    from megatron.core.tensor_parallel import mappings

    log = []
    patched = []

    def wrap(owner, name):
        fn = getattr(owner, name, None)
        if fn is None:
            return

        def counted(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            lists = [a for a in args if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)]
            if "gather" in name and (tensors or lists):
                nbytes = (sum(t.numel() * t.element_size() for t in lists[0]) if lists
                          else tensors[0].numel() * tensors[0].element_size())
            else:
                nbytes = tensors[0].numel() * tensors[0].element_size() if tensors else 0
            log.append((name, nbytes))
            return fn(*args, **kwargs)

        setattr(owner, name, counted)
        patched.append((owner, name, fn))

    for name in _COLLECTIVES:
        wrap(torch.distributed, name)
    for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
        wrap(mappings, name)
    try:
        yield log
    finally:
        for owner, name, fn in reversed(patched):
            setattr(owner, name, fn)


def sp_target(rank, world, k: int) -> dict:
    """TP = 2 with sequence parallelism: the capture's layer hook gets this rank's S/2 positions
    of each layer's output (as Megatron's SP decoder hands them); returns the target and every
    collective the hook issued (bytes), with the full hidden states for a reference."""
    from megatron.core import parallel_state as ps

    from nemo_basic.models.capture import SupervisionCapture

    W.tiny.init_parallel(2, 1)
    seq, batch, hidden, vocab = 16, 3, 8, 20
    pos = torch.arange(seq)
    image = torch.stack([(pos >= 5) & (pos <= 10),                      # crosses the shard boundary
                         torch.zeros(seq, dtype=torch.bool),             # no image
                         ((pos >= 9) & (pos <= 12)) | (pos == 14)])      # second shard only
    text = ~image & (pos < 15)
    g = torch.Generator().manual_seed(11)  # the same on both ranks, as the replicated model's data
    states = [torch.randn(seq, batch, hidden, generator=g) for _ in range(k)]
    projected = torch.randn(seq, batch, hidden, generator=g).requires_grad_()
    capture = SupervisionCapture(BasicConfig(layers=k, degree="equal", sds=False), num_layers=4, vocab_size=vocab)
    capture.embedding = torch.randn(vocab, hidden, generator=g)
    capture.begin(image, text)
    capture.set_projected(projected)
    shard = seq // 2
    with _collective_bytes() as log:
        for layer in range(1, k + 1):
            capture.after_layer(layer, states[layer - 1][rank * shard:(rank + 1) * shard])
    out = {"target": capture.target.detach().clone(), "collectives": log, "image_mask": image,
           "states": states, "width": capture.layout.width, "das": capture.logs[-1]["das"],
           "tp": ps.get_tensor_model_parallel_world_size()}
    ps.destroy_model_parallel()
    return out


def target_in_place(rank, world, k: int) -> dict:
    """Without sequence parallelism: the target's storage after each layer 1..k (eq. 4's running
    sum is added into one buffer), the target, and the hidden states for a reference."""
    from megatron.core import parallel_state as ps

    from nemo_basic.models.capture import SupervisionCapture

    W.tiny.init_parallel(1, 1)
    seq, batch, hidden, vocab = 16, 3, 8, 20
    pos = torch.arange(seq)
    image = torch.stack([(pos >= 5) & (pos <= 10), torch.zeros(seq, dtype=torch.bool), (pos >= 9) & (pos <= 12)])
    text = ~image & (pos < 15)
    g = torch.Generator().manual_seed(12)
    states = [torch.randn(seq, batch, hidden, generator=g) for _ in range(k)]
    capture = SupervisionCapture(BasicConfig(layers=k, degree="equal", sds=False), num_layers=4, vocab_size=vocab)
    capture.embedding = torch.randn(vocab, hidden, generator=g)
    capture.begin(image, text)
    capture.set_projected(torch.randn(seq, batch, hidden, generator=g).requires_grad_())
    pointers = []
    for layer in range(1, k + 1):
        capture.after_layer(layer, states[layer - 1])
        pointers.append(capture.target.data_ptr())
    out = {"pointers": pointers, "target": capture.target.clone(), "states": states, "image_mask": image,
           "width": capture.layout.width}
    ps.destroy_model_parallel()
    return out
