"""CPU backend for NeMo 2.7.3's `nemo.lightning` training loop (MegatronStrategy on
`Trainer(accelerator="cpu")`), on top of `megatron_cpu`. Applied by
`nemo_basic.compat.apply_nemo()` only when CUDA is unavailable.
"""
from __future__ import annotations

import contextlib

import torch

from nemo_basic.compat.registry import PatchSet

PATCHES = PatchSet("NeMo 2 lightning on CPU")
_MODE = None  # the global CudaToCpu torch-function mode, once pushed


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


@PATCHES.register(
    "cuda_device_literals",
    "device='cuda' / .to('cuda') / .cuda() / pin_memory=True in megatron's optimizer, grad scaler "
    "and DDP buffers and in NeMo's MegatronStrategy (logging reductions, batch transfer)",
    "'Torch not compiled with CUDA enabled' at many call sites",
)
def _cuda_device_literals() -> None:
    # Too many call sites to patch one by one; a torch-function mode rewrites the device argument
    # of every factory call and Tensor.to/.cuda while NeMo trains on the CPU.
    global _MODE
    from torch.overrides import TorchFunctionMode

    class CudaToCpuMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "device" in kwargs and _is_cuda(kwargs["device"]):
                kwargs = dict(kwargs, device="cpu")
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
            if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
                return args[0]
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
                args = (args[0], "cpu") + tuple(args[2:])
            return func(*args, **kwargs)

    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # stays pushed for the life of the process


@PATCHES.register(
    "cuda_stream",
    "nemo.lightning.megatron_parallel.MegatronParallel.init_model_parallel: "
    "with torch.cuda.stream(torch.cuda.Stream()): self.init_ddp()",
    "'torch.cuda.Stream requires CUDA support'",
)
def _cuda_stream() -> None:
    torch.cuda.Stream = _NoStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


class _NoStream:
    """Stands in for `torch.cuda.Stream` without CUDA. A class, not a function: code that only
    annotates with it must still evaluate (transformers 5.x writes `torch.cuda.Stream | None` in a
    signature, generation/continuous_batching/input_outputs.py, which a lambda turns into a
    TypeError at import)."""

    def __init__(self, *args, **kwargs):
        pass


@PATCHES.register(
    "rng_seed",
    "nemo.lightning.megatron_init._set_random_seed seeds megatron's RNG tracker only "
    "`if torch.cuda.device_count() > 0`",
    "DotProductAttention's tracker fork: 'model-parallel-rng is not added'",
)
def _rng_seed() -> None:
    import nemo.lightning.megatron_init as megatron_init
    from megatron.core import parallel_state, tensor_parallel

    original = megatron_init._set_random_seed

    def _set_random_seed(seed):
        original(seed)
        if torch.cuda.device_count() == 0:  # what upstream does on GPUs, with its PP offset
            tensor_parallel.model_parallel_cuda_manual_seed(
                seed + 100 * parallel_state.get_pipeline_model_parallel_rank())

    megatron_init._set_random_seed = _set_random_seed


@PATCHES.register(
    "ckpt_device_fixup",
    "nemo.lightning.io.pl._fix_tensors_device: assert torch.cuda.is_initialized()",
    "AssertionError in MegatronCheckpointIO.load_checkpoint",
)
def _ckpt_device_fixup() -> None:
    import nemo.lightning.io.pl as nemo_pl

    nemo_pl._fix_tensors_device = lambda checkpoint: checkpoint  # tensors are already on the CPU
