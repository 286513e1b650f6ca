"""Rank functions for the BASIC-in-NeVA tests (spawned processes, real gloo groups)."""
from __future__ import annotations

from functools import partial

import torch

from nemo_basic.testing import tiny, tiny_neva  # tiny_neva applies the NeMo CPU backend
from nemo_basic.models.basic_config import BasicConfig
from nemo_basic.models.neva import BasicNevaConfig, BasicNevaModel

MICRO_BATCHES = 2


def build(basic: BasicConfig | None, tp: int = 1, pp: int = 1, num_layers: int = 4, seed: int = 1234,
          freeze_vision: bool = True, plain: bool = False, micro_batch_size: int = 2,
          init_method_std: float = 0.02, recompute: str | None = None):
    """The tiny NeVA (plain NevaConfig, or BasicNevaConfig with `basic`) for this rank's stage."""
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator, init_num_microbatches_calculator)

    tiny.init_parallel(tp, pp, seed)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(0, None, MICRO_BATCHES * micro_batch_size, micro_batch_size, 1)
    kwargs = dict(freeze_vision_model=freeze_vision, tensor_model_parallel_size=tp,
                  pipeline_model_parallel_size=pp, init_method_std=init_method_std)
    if plain:
        config = tiny_neva.tiny_neva_config(num_layers=num_layers, **kwargs)
    else:
        config = tiny_neva.tiny_neva_config(BasicNevaConfig, num_layers=num_layers, basic=basic, **kwargs)
    config.language_transformer_config.pipeline_dtype = torch.float32
    config.pipeline_dtype = torch.float32
    lm = config.language_transformer_config
    if recompute == "full":      # every layer re-run in backward, one at a time
        lm.recompute_granularity, lm.recompute_method, lm.recompute_num_layers = "full", "uniform", 1
    elif recompute == "selective":  # core attention re-run in backward
        lm.recompute_granularity = "selective"  # the schedule reads the model's (NeVA's) config
    return config.configure_model(tiny_neva.TinyTokenizer())


def mixed_batch(seed: int = 7) -> tiny.Batch:
    """Three samples: text-only with 4 padding tokens; two images; four images (truncated: the
    combined 4·16 + 16 = 80 positions exceed the 64 the model keeps)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, tiny.VOCAB, (3, 20), generator=g)
    ids[0, 16:] = 0                      # right padding of the text-only sample
    ids[1, [2, 9]] = -200
    ids[2, [1, 5, 6, 12]] = -200
    return tiny.Batch(input_ids=ids, labels=torch.randint(1, tiny.VOCAB, (3, 20), generator=g),
                      loss_mask=torch.ones(3, 20), images=torch.randn(6, 3, tiny.IMG, tiny.IMG, generator=g),
                      num_image_tiles=torch.ones(6, dtype=torch.int), text_lengths=torch.tensor([16, 20, 20]))


def text_only_batch(seed: int = 9) -> tiny.Batch:
    """Three text-only samples (the second right padded): a micro-batch with no image at all, as
    the data module yields for LLaVA-665k's text-only conversations ([0, 3, H, W] media)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, tiny.VOCAB, (3, 20), generator=g)
    ids[1, 12:] = 0
    return tiny.Batch(input_ids=ids, labels=torch.randint(1, tiny.VOCAB, (3, 20), generator=g),
                      loss_mask=torch.ones(3, 20), images=torch.zeros(0, 3, tiny.IMG, tiny.IMG),
                      num_image_tiles=torch.ones(0, dtype=torch.int), text_lengths=torch.tensor([20, 12, 20]))


def batches(kind: str) -> list:
    if kind == "mixed":
        return [mixed_batch(7), mixed_batch(8)]
    if kind == "textonly":  # an image-free micro-batch first, then a mixed one
        return [text_only_batch(9), mixed_batch(8)]
    return [tiny.tiny_batch(seed=i) for i in range(MICRO_BATCHES)]


def _call(model, b: tiny.Batch):
    extra = {"text_lengths": b.text_lengths} if hasattr(model, "capture") else {}  # plain NeVA lacks it
    return model(input_ids=b.input_ids, position_ids=None, loss_mask=b.loss_mask, labels=b.labels,
                 images=b.images, num_image_tiles=b.num_image_tiles, **extra)


# -- single process ------------------------------------------------------------------------------

def disabled_equals_plain(rank, world) -> dict:
    """BASIC disabled vs plain NeVA, same weights and batch: loss and every gradient."""
    from megatron.core import parallel_state as ps

    results = []
    state = None
    for plain in (True, False):
        model = build(BasicConfig(enabled=False), plain=plain, freeze_vision=False)
        if not plain:  # NeVA's own masking (it never trains the first token after an image)
            model.config.train_first_token_after_image = False
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state, strict=True)
        out, mask = _call(model, tiny.tiny_batch(0))
        loss = tiny.lm_loss(out, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        ps.destroy_model_parallel()
    (loss_a, grads_a), (loss_b, grads_b) = results
    return {"loss_equal": torch.equal(loss_a, loss_b), "names_equal": grads_a.keys() == grads_b.keys(),
            "grads_equal": all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)}


def grads_with_zero_lm_mask(rank, world) -> dict:
    """LM loss mask all zeros: which parameters get a nonzero gradient from the aux losses."""
    model = build(BasicConfig(layers=2), freeze_vision=True)
    b = tiny.tiny_batch(0)
    out, mask = _call(model, b)
    loss = (out * torch.zeros_like(mask)).sum()  # L_lm contributes nothing
    loss.backward()
    nonzero = sorted(n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    return {"nonzero": nonzero, "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "logs": model.capture.logs}


def _keep_qk(seen, n, module, args):
    seen["q"][n], seen["k"][n] = args[0].detach().clone(), args[1].detach().clone()
    # returns None: the arguments pass on unchanged


def capture_internals(rank, world, k: int, kind: str, degree: str = "attention") -> dict:
    """Everything an independent recomputation needs, read with plain hooks: the decoder input,
    each layer's output, each layer's query/key as handed to core attention, the embedding."""
    # A wider initialisation makes each layer move the hidden states visibly, so that the target
    # differs from V and the losses are far from zero (a stricter comparison).
    model = build(BasicConfig(layers=k, degree=degree), micro_batch_size=3 if kind == "mixed" else 2,
                  init_method_std=0.3)
    layers = model.language_model.decoder.layers
    seen = {"hidden": {}, "q": {}, "k": {}}

    def pre_decoder(module, args, kwargs):
        seen["input"] = (kwargs.get("hidden_states", args[0] if args else None)).detach().clone()

    layers[0].register_forward_pre_hook(pre_decoder, with_kwargs=True)
    for layer in layers:
        n = layer.layer_number
        layer.register_forward_hook(lambda m, a, o, n=n: seen["hidden"].__setitem__(n, o[0].detach().clone()))
        layer.self_attention.core_attention.register_forward_pre_hook(partial(_keep_qk, seen, n))
    b = batches(kind)[0]
    out, mask = _call(model, b)
    tiny.lm_loss(out, mask).backward()
    return {"input": seen["input"], "hidden": seen["hidden"], "q": seen["q"], "k": seen["k"],
            "embedding": model.language_model.embedding.word_embeddings.weight.detach().clone(),
            "image_mask": model.capture.image_mask, "text_mask": model.capture.text_mask,
            "logs": model.capture.logs[-1], "input_ids": b.input_ids, "text_lengths": b.text_lengths,
            "scale": layers[0].self_attention.core_attention.softmax_scale}


# -- through Megatron's schedule: TP / PP parity ---------------------------------------------------

def _forward_step(data_iterator, model):
    b = next(data_iterator)
    out, mask = _call(model, b)

    def loss_func(output_tensor):
        loss = tiny.lm_loss(output_tensor, mask)
        return loss, {"lm loss": loss.detach().clone()}

    return out, loss_func


def run_schedule(rank, world, tp: int, pp: int, k: int, kind: str, ref_path: str | None, save_path: str | None,
                 recompute: str | None = None):
    """Forward/backward over 2 micro-batches with Megatron's schedule for this (TP, PP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs = 3 if kind in ("mixed", "textonly") else 2
    model = build(BasicConfig(layers=k), tp=tp, pp=pp, micro_batch_size=mbs, recompute=recompute)
    if save_path is not None:
        torch.save(model.state_dict(), save_path)
    if ref_path is not None:
        full = torch.load(ref_path)
        if pp > 1:
            stage = ps.get_pipeline_model_parallel_rank()
            model.load_state_dict(tiny.remap_pipeline_state_dict(full, model, 4 // pp, stage), strict=True)
        for name, p in model.named_parameters():  # TP: Megatron's CPU init slices the same master
            ref = full[tiny_key(name, pp)] if pp > 1 else full[name]
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                ref = ref.chunk(tp, dim=p.partition_dim)[ps.get_tensor_model_parallel_rank()]
            assert torch.equal(p.detach(), ref), f"{name} differs from the reference weights"
    data = iter(batches(kind))
    model.sync_supervision_embedding()  # once per step, outside the schedule (no-op unless carried)
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=data, model=[model], num_microbatches=MICRO_BATCHES,
        seq_length=model.pipeline_seq_length(), micro_batch_size=mbs, forward_only=False)
    out = {"stage": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank()}
    if ps.is_pipeline_last_stage():
        out["lm"] = [x["lm loss"].item() for x in losses]
    if model.capture is not None and model.capture.logs:
        out["logs"] = [{k_: v.item() for k_, v in entry.items()} for entry in model.capture.logs]
    if ps.is_pipeline_first_stage():
        grads = {}
        for name, p in model.vision_projection.named_parameters():
            g = p.grad.clone()
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                parts = [torch.empty_like(g) for _ in range(tp)]
                torch.distributed.all_gather(parts, g, group=ps.get_tensor_model_parallel_group())
                g = torch.cat(parts, dim=p.partition_dim)
            grads[name] = g
        out["projector_grads"] = grads
    ps.destroy_model_parallel()
    return out


def tiny_key(name: str, pp: int) -> str:
    """The single-stage name of this stage's parameter `name` (decoder layer index + offset)."""
    from megatron.core import parallel_state as ps

    prefix = "language_model.decoder.layers."
    if not name.startswith(prefix):
        return name
    idx, tail = name[len(prefix):].split(".", 1)
    return f"{prefix}{int(idx) + ps.get_pipeline_model_parallel_rank() * (4 // pp)}.{tail}"


# -- NeMo training loop ----------------------------------------------------------------------------

def nemo_train_logs(rank, world, tp: int, pp: int, steps: int, k: int = 2) -> dict:
    """Train the tiny BASIC NeVA with nemo.lightning; return the logged metrics of every step."""
    import lightning.pytorch as pl

    config = tiny_neva.tiny_neva_config(BasicNevaConfig, basic=BasicConfig(layers=k), freeze_vision_model=True,
                                        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    trainer, model = tiny_neva.tiny_trainer_and_model(tp, pp, steps, model_cls=BasicNevaModel, config=config)
    history = []

    class Record(pl.Callback):
        # Lightning calls callbacks' on_train_batch_end before the module's (where BASIC logs), so
        # each step's metrics are read when the next step starts, and at the end.
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step > 0:
                history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

        def on_train_end(self, trainer, *_):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer.callbacks.append(Record())
    trainer.fit(model, tiny_neva.SyntheticNevaDataModule())
    return {"history": history, "step": trainer.global_step}


def host_syncs(rank, world, cases) -> list:
    """Host synchronisations of one forward + backward, BASIC on minus BASIC off (same weights,
    same batch), for each (k, batch size) case: what BASIC adds per micro-batch."""
    from megatron.core import parallel_state as ps

    from nemo_basic.testing.syncs import count_host_syncs

    out = []
    for k, batch_size in cases:
        counts = {}
        for enabled in (False, True):
            model = build(BasicConfig(enabled=enabled, layers=k), num_layers=4, micro_batch_size=batch_size)
            b = tiny.tiny_batch(3, batch_size=batch_size)
            _call(model, b)  # warm-up: one-time work (e.g. kernel probes) is not per micro-batch
            model.zero_grad(set_to_none=True)
            with count_host_syncs() as counter:
                per_token, mask = _call(model, b)
                tiny.lm_loss(per_token, mask).backward()
            counts[enabled] = dict(counter.counts)
            if enabled:
                counts["logged"] = len(model.capture.logs) > 0
            ps.destroy_model_parallel()
        added = {name: counts[True].get(name, 0) - counts[False].get(name, 0)
                 for name in set(counts[True]) | set(counts[False])}
        out.append({"k": k, "batch": batch_size, "added": added, "on": counts[True], "off": counts[False],
                    "logged": counts["logged"]})
    return out


def packed_sequences_rejected(rank, world) -> str:
    """A THD-packed micro-batch reaching a BASIC model: the error it raises."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from nemo_basic.models.basic_config import BasicConfigError

    model = build(BasicConfig(layers=2))
    b = tiny.tiny_batch(0)
    cu = torch.tensor([0, 20, 40], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=20, max_seqlen_kv=20)
    try:
        model(input_ids=b.input_ids, position_ids=None, loss_mask=b.loss_mask, labels=b.labels, images=b.images,
              num_image_tiles=b.num_image_tiles, packed_seq_params=packed)
    except BasicConfigError as e:
        return str(e)
    return "no error"


def fp8_sequence_padding(rank, world) -> dict:
    """Combined sequence length NeVA's _preprocess_data builds, with and without FP8 set."""
    model = build(BasicConfig(layers=2))
    b = tiny.tiny_batch(0)
    hidden = model.language_model.config.hidden_size
    images = torch.zeros(model._img_seq_len, b.images.shape[0], hidden)
    text = torch.zeros(b.input_ids.shape[0], b.input_ids.shape[1], hidden)
    out = {}
    for fp8 in (None, "hybrid"):
        model.language_model.config.fp8 = fp8
        combined, labels, loss_mask, _ = model._preprocess_data(
            images, text, b.input_ids, b.loss_mask, b.labels, False, -200, b.num_image_tiles, None, None)
        out[str(fp8)] = (combined.shape[0], labels.shape[1], float(loss_mask[:, 35:].abs().sum()))
    return out


def study_arm_switch(rank, world) -> dict:
    """study.engine.set_basic on ONE model built with BASIC on (as the study builds it)
    against a fresh model built with each arm's settings, same weights and batch: the LM loss,
    every gradient and the logged BASIC losses."""
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps

    from study import engine as E
    from study.protocol import arm_basic

    def step(model):
        for p in model.parameters():
            p.grad = None
        out, mask = _call(model, mixed_batch(7))
        loss = tiny.lm_loss(out, mask)
        loss.backward()
        logs = {}
        if model.capture is not None:
            logs = {name: float(total) / count for name, (total, count) in model.capture.pop_logs().items()}
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, logs

    switched = build(BasicConfig(), freeze_vision=False)
    state = switched.state_dict()
    built = SimpleNamespace(mcore=switched)
    out = {}
    for arm in ("llava", "const", "equal", "sds_only", "basic", "llava"):
        E.set_basic(built, arm_basic(arm))
        got = step(switched)
        ps.destroy_model_parallel()
        fresh = build(arm_basic(arm), freeze_vision=False)
        fresh.load_state_dict(state, strict=False)
        want = step(fresh)
        ps.destroy_model_parallel()
        tiny.init_parallel(1, 1, 1234)  # the switched model keeps running in this process
        out[arm] = {"loss_equal": torch.equal(got[0], want[0]), "grad_names_equal": got[1].keys() == want[1].keys(),
                    "max_grad_diff": max(float((got[1][n] - want[1][n]).abs().max()) for n in want[1]),
                    "logs": got[2], "want_logs": want[2]}
    return out


def layer_scaled_attention(rank, world) -> dict:
    """Megatron's local DotProductAttention at layer 3 with `apply_query_key_layer_scaling` (its
    stored softmax_scale is divided by 3, its softmax multiplies by 3): errors of the module and of
    the lse kernel at `softmax_scale_of(module)`, against float64 causal attention at 1/√D."""
    import math

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_basic.models.capture import sdpa_with_lse, softmax_scale_of

    tiny.init_parallel(1, 1, 1234)
    S, B, H, D = 12, 2, 4, 16
    config = TransformerConfig(num_layers=4, hidden_size=H * D, num_attention_heads=H, use_cpu_initialization=True,
                               apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True,
                               masked_softmax_fusion=False, attention_dropout=0.0)
    module = DotProductAttention(config, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(S, B, H, D, generator=g) for _ in range(3))
    own = module(q, k, v, attention_mask=None, attn_mask_type=AttnMaskType.causal)  # [S, B, H·D]
    scale = softmax_scale_of(module, D)
    fused, _ = sdpa_with_lse(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), scale)
    fused = fused.permute(2, 0, 1, 3).reshape(S, B, H * D)
    qd, kd, vd = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    scores = (qd @ kd.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    ref = (scores.softmax(-1) @ vd).permute(2, 0, 1, 3).reshape(S, B, H * D)
    return {"stored_softmax_scale": module.softmax_scale, "scale": scale,
            "module_err": float((own.double() - ref).abs().max()),
            "fused_err": float((fused.double() - ref).abs().max())}
