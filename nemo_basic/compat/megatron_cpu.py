"""CPU backend for megatron-core: the hard-coded CUDA calls on the training path, one patch each.

Applied by `nemo_basic.compat.apply()` only when CUDA is unavailable. With these, the real
Megatron-core GPT/LLaVA models, tensor parallelism (gloo all-reduce) and the pipeline schedules
(gloo p2p) run unchanged on a CPU; the parity tests compare them with single-process runs.
Checked against megatron-core 0.15.3 (and 0.16.1).
"""
from __future__ import annotations

import contextlib
import types

import torch

from nemo_basic.compat.registry import PatchSet

PATCHES = PatchSet("megatron-core on CPU")


@PATCHES.register(
    "rng_tracker",
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add / .fork",
    "the tracker stores CUDA generator states: 'Torch not compiled with CUDA enabled'",
)
def _rng_tracker() -> None:
    # Same semantics on the CPU generator: named, separately seeded streams (e.g. the per-TP-rank
    # stream used for dropout and for initialising TP-sharded weights).
    from megatron.core.tensor_parallel import random as mrandom

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork


@PATCHES.register(
    "current_device",
    "torch.cuda.current_device() used as a device (GlobalMemoryBuffer, p2p shape tensors, TP buffers)",
    "'Torch not compiled with CUDA enabled'",
)
def _current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"


@PATCHES.register(
    "tensor_cuda",
    "megatron.core.models.vision.clip_vit_model.CLIPViTModel.__init__: position_ids ... .cuda()",
    "'Torch not compiled with CUDA enabled'",
)
def _tensor_cuda() -> None:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


@PATCHES.register(
    "causal_mask",
    "megatron.core.transformer.utils.get_default_causal_mask / get_sliding_window_causal_mask",
    "the masks are built with device='cuda'",
)
def _causal_mask() -> None:
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as tutils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    def get_sliding_window_causal_mask(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    for mod in (fused_softmax, tutils):  # fused_softmax imported the names by value
        mod.get_default_causal_mask = get_default_causal_mask
        mod.get_sliding_window_causal_mask = get_sliding_window_causal_mask


@PATCHES.register(
    "clip_vit_norm",
    "megatron.core.models.vision.clip_vit_model.CLIPViTModel.__init__ defaults ln_pre_impl/ln_post_impl",
    "without TE the default is torch.nn.LayerNorm, which build_module() calls with config=...: TypeError",
)
def _clip_vit_norm() -> None:
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    defaults = clip_vit_model.CLIPViTModel.__init__.__defaults__
    clip_vit_model.CLIPViTModel.__init__.__defaults__ = tuple(
        WrappedTorchNorm if d is torch.nn.LayerNorm else d for d in defaults)
    if getattr(clip_vit_model, "NORM_IMPL", None) is torch.nn.LayerNorm:
        clip_vit_model.NORM_IMPL = WrappedTorchNorm


@PATCHES.register(
    "schedules_token_count",
    "megatron.core.pipeline_parallel.schedules: total_num_tokens = torch.zeros(..., device='cuda')",
    "'Torch not compiled with CUDA enabled' in every schedule",
)
def _schedules_token_count() -> None:
    from megatron.core.pipeline_parallel import schedules

    class _TorchOnCpu(types.ModuleType):
        """The schedules module's view of `torch`, with zeros(device='cuda') mapped to the CPU."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return torch.zeros(*args, **kwargs)

    schedules.torch = _TorchOnCpu("torch")


@PATCHES.register(
    "cuda_synchronize",
    "torch.cuda.synchronize() in p2p_communication (batch_p2p_sync) and dist-checkpoint preload",
    "'Torch not compiled with CUDA enabled'",
)
def _cuda_synchronize() -> None:
    torch.cuda.synchronize = lambda *args, **kwargs: None


@PATCHES.register(
    "clip_grads_type_assert",
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32: "
    "assert param.grad.type() == 'torch.cuda.FloatTensor'",
    "AssertionError on CPU tensors whenever clip_grad > 0",
)
def _clip_grads() -> None:
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    from megatron.core.utils import to_local_if_dtensor

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [to_local_if_dtensor(getattr(p, attr)).detach() for p in parameters
                 if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@PATCHES.register(
    "rng_state_accessors",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state, used by "
    "CheckpointFunction (activation recomputation) to save and restore the RNG around a re-run",
    "'Torch not compiled with CUDA enabled' as soon as recompute_granularity is set",
)
def _rng_state_accessors() -> None:
    # The CPU generator stands in for the CUDA one (as in the rng_tracker patch): the re-run
    # then draws the same dropout masks as the first forward.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
