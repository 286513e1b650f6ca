"""The CPU backend: active without CUDA, inert with it, every patch named and documented."""
import subprocess
import sys
import textwrap

import pytest
import torch

# Every attribute any CPU patch may replace, read as an object identity.
_TARGETS = textwrap.dedent("""
    import torch
    import megatron.core.tensor_parallel.random as r, megatron.core.transformer.utils as tu
    import megatron.core.fusions.fused_softmax as fs, megatron.core.pipeline_parallel.schedules as sch
    import megatron.core.optimizer.clip_grads as cg, megatron.core.optimizer.optimizer as opt
    import megatron.core.models.vision.clip_vit_model as cvm, megatron.core.optimizer as mopt
    import nemo.lightning.megatron_init as mi, nemo.lightning.io.pl as nlpl
    def targets():
        return [r.CudaRNGStatesTracker.add, r.CudaRNGStatesTracker.fork, torch.cuda.current_device,
                torch.Tensor.cuda, tu.get_default_causal_mask, fs.get_default_causal_mask,
                cvm.CLIPViTModel.__init__.__defaults__, sch.torch, torch.cuda.synchronize,
                cg.clip_grad_by_total_norm_fp32, opt.clip_grad_by_total_norm_fp32, torch.cuda.Stream,
                r._get_cuda_rng_state, r._set_cuda_rng_state,
                torch.cuda.stream, mi._set_random_seed, nlpl._fix_tensors_device,
                mopt.get_megatron_optimizer, torch.overrides._get_current_function_mode_stack()]
""")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_inert_when_cuda_is_present():
    # Upstream modules are imported first (they probe the device at import); then the machine is
    # made to report CUDA, as the NGC container does, before nemo_basic decides what to patch.
    # (torchvision's two op schemas are defined inline: importing nemo_basic here would patch early)
    code = ("import torch\nlib = torch.library.Library('torchvision', 'DEF')\n"
            "lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
            "lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
            + _TARGETS + textwrap.dedent("""
            before = [repr(x) if isinstance(x, (tuple, list)) else id(x) for x in targets()]
            torch.cuda.is_available = lambda: True
            import nemo_basic
            from nemo_basic import compat
            active = [p for p in nemo_basic.ACTIVE_PATCHES + compat.apply_nemo() if p != "torchvision_shim"]
            after = [repr(x) if isinstance(x, (tuple, list)) else id(x) for x in targets()]
            print(active, before == after)
            """))
    assert _run(code) == "[] True"


def test_active_on_this_cpu_machine():
    assert not torch.cuda.is_available()
    code = ("import nemo_basic\nfrom nemo_basic import compat\n" + "print(sorted(compat.apply_nemo()))")
    active = eval(_run(code))
    from nemo_basic.compat import megatron_cpu, nemo_cpu

    expected = {p.name for p in megatron_cpu.PATCHES.patches + nemo_cpu.PATCHES.patches}
    assert expected <= set(active)


def test_every_patch_names_its_upstream_call():
    from nemo_basic import compat
    from nemo_basic.compat import megatron_cpu, nemo_cpu, versions

    text = compat.describe()
    for patch_set in (megatron_cpu.PATCHES, nemo_cpu.PATCHES, versions.PATCHES):
        for p in patch_set.patches:
            assert p.upstream and p.why and p.name in text


def test_megatron_patches_follow_the_first_megatron_import():
    """`import nemo_basic` does not import megatron-core; the CPU patches land when it is imported."""
    code = textwrap.dedent("""
        import sys
        import nemo_basic
        before = "megatron.core" in sys.modules, list(nemo_basic.ACTIVE_PATCHES)
        import megatron.core.tensor_parallel.random as r
        print(before[0], "rng_tracker" in before[1], "rng_tracker" in nemo_basic.ACTIVE_PATCHES,
              r.CudaRNGStatesTracker.add.__module__)
    """)
    assert _run(code) == "False False True nemo_basic.compat.megatron_cpu"


@pytest.mark.gpu_path
def test_megatron_imports_without_a_visible_gpu_and_no_inline_build():
    """megatron-core builds a CUDA extension when imported (inference/unified_memory.py); with a CUDA
    torch and no visible GPU, torch 2.11 raises IndexError there (reproduced: load_inline made to
    raise it). With nemo_basic imported first the build is never attempted and the module says what
    upstream says when the build fails: no unified memory."""
    code = textwrap.dedent("""
        import torch.utils.cpp_extension as ext
        calls = []
        def load_inline(*args, **kwargs):
            calls.append(kwargs.get("name"))
            raise IndexError("list index out of range")  # torch 2.11, no GPU, TORCH_CUDA_ARCH_LIST unset
        ext.load_inline = load_inline
        import nemo_basic
        import megatron.core
        import megatron.core.inference.contexts.dynamic_context as dc
        from megatron.core.inference import unified_memory as um
        try:
            um.create_unified_mempool()
            refused = False
        except AssertionError:
            refused = True
        print(calls, dc.has_unified_memory, um.has_unified_memory, refused,
              "unified_memory_build" in nemo_basic.ACTIVE_PATCHES)
    """)
    assert _run(code) == "[] False False True True"


@pytest.mark.gpu_path
def test_cuda_stream_stand_in_is_a_class():
    """transformers 5.x annotates `torch.cuda.Stream | None` at import
    (generation/continuous_batching/input_outputs.py): the CPU stand-in must support `|`."""
    code = textwrap.dedent("""
        import nemo_basic
        from nemo_basic import compat
        compat.apply_nemo()
        import torch
        hint = torch.cuda.Stream | None
        with torch.cuda.stream(torch.cuda.Stream()):
            pass
        print(type(torch.cuda.Stream()).__name__, hint == (torch.cuda.Stream | None))
    """)
    assert _run(code) == "_NoStream True"
