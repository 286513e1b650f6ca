"""CUDA without Transformer Engine or apex: each Megatron fusion flag is on only where its kernel
imports (nemo_basic.compat.kernels), so the paper's LLM configs build on a bare CUDA machine.

The machine is simulated here by forcing the GPU backend (NEMO_BASIC_CPU_BACKEND=0) on this CPU
machine, which has neither TE nor apex: the same decisions a bare H100 with pip-installed torch
takes. On today's NeMo defaults the config build raises "apply_rope_fusion is not available"."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from nemo_basic.compat import kernels

pytestmark = pytest.mark.gpu_path

# The rule, written out flag by flag: what each one's kernel needs.
NEEDS = {
    "apply_rope_fusion": "te",                      # TE's fused_apply_rotary_pos_emb only
    "persist_layer_norm": "te",                     # WrappedTorchNorm (local RMSNorm) asserts it off
    "masked_softmax_fusion": "te_or_apex",          # scaled_*softmax_cuda (apex); unused by TE's spec
    "gradient_accumulation_fusion": "te_or_apex",   # fused_weight_gradient_mlp_cuda (apex); TE's own
    "bias_activation_fusion": "compile",            # Megatron's torch.compile'd functions: Triton + cc
    "bias_dropout_fusion": "compile",
    "cross_entropy_loss_fusion": "compile",
}


def expected(te: bool, apex: bool, compile_: bool) -> dict:
    have = {"te": te, "te_or_apex": te or apex, "compile": compile_}
    return {flag: have[need] for flag, need in NEEDS.items()}


@pytest.mark.parametrize("te, apex, compile_", [(False, False, True), (False, True, True), (True, False, True),
                                                (False, False, False), (True, True, False)])
def test_each_fusion_flag_follows_its_kernel(monkeypatch, te, apex, compile_):
    apex_modules = {m for ms in kernels.APEX_KERNELS.values() for m in ms}
    monkeypatch.setattr(kernels, "importable", lambda name: apex and name in apex_modules)
    got = kernels.fusion_flags(gpu_backend=True, transformer_engine=te, torch_compile=compile_)
    assert got == expected(te, apex, compile_)
    assert set(got) == set(kernels.FUSION_FLAGS)


def test_cpu_backend_turns_every_fusion_off():
    assert kernels.fusion_flags(gpu_backend=False, transformer_engine=True, torch_compile=True) == dict.fromkeys(
        NEEDS, False)


def test_one_apex_kernel_missing_keeps_its_flag_off(monkeypatch):
    # apex built without its Megatron softmax kernels: the softmax fusion stays off, the other on
    monkeypatch.setattr(kernels, "importable", lambda name: name == "fused_weight_gradient_mlp_cuda")
    got = kernels.fusion_flags(gpu_backend=True, transformer_engine=False, torch_compile=True)
    assert got["masked_softmax_fusion"] is False and got["gradient_accumulation_fusion"] is True


def test_torch_compile_needs_triton_a_compiler_and_python_headers(monkeypatch, tmp_path):
    include = tmp_path / "include"
    include.mkdir()
    monkeypatch.setattr(kernels.sysconfig, "get_paths", lambda: {"include": str(include)})
    monkeypatch.setattr(kernels, "importable", lambda name: name == "triton")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on PATH
    monkeypatch.delenv("CC", raising=False)
    (include / "Python.h").write_text("")
    assert kernels.torch_compile_can_build() is False
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    assert kernels.torch_compile_can_build() is True
    (include / "Python.h").unlink()  # an interpreter without its development headers
    assert kernels.torch_compile_can_build() is False
    (include / "Python.h").write_text("")
    monkeypatch.setattr(kernels, "importable", lambda name: False)  # no Triton
    assert kernels.torch_compile_can_build() is False


def test_importable_finds_without_importing():
    assert kernels.importable("json") and not kernels.importable("scaled_masked_softmax_cuda")
    assert not kernels.importable("")  # find_spec's ValueError is a "no"


VICUNA_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "vocab_size": 32000, "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0}

_GPU_BACKEND_BUILD = textwrap.dedent("""
    import json, sys
    import torch
    import nemo_basic
    from nemo_basic import compat
    from nemo_basic.compat import kernels
    from nemo_basic.models.builder import language_config_from_hf
    vicuna = json.loads(sys.argv[1])
    out = {"cpu_backend": compat.cpu_backend_needed(), "patches": [p for p in nemo_basic.ACTIVE_PATCHES
                                                                   if p != "torchvision_shim"],
           "te": kernels.have_transformer_engine()}
    config = language_config_from_hf(vicuna, seq_length=2048)  # runs TransformerConfig.__post_init__
    out["flags"] = {f: getattr(config, f) for f in kernels.FUSION_FLAGS}
    out["compile"] = kernels.torch_compile_can_build()
    # the self-test's tiny model: initialised on the device (TE quantises FP8 primary weights there)
    # and with this machine's fusions, as a paper config gets them
    from nemo_basic.testing import tiny_neva
    tiny = tiny_neva.tiny_language_config()
    out["tiny"] = {"use_cpu_initialization": tiny.use_cpu_initialization,
                   "flags": {f: getattr(tiny, f) for f in kernels.FUSION_FLAGS}}
    out["config_classes"] = [c.__name__ for c in type(config).__mro__]

    # The local spec's modules accept that config: the RMSNorm (asserts persist_layer_norm off) and
    # the attention softmax (would import scaled_masked_softmax_cuda for a bf16 [b, np, sq, sk] batch
    # the kernel takes, e.g. S = 1024).
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from megatron.core.transformer.spec_utils import build_module
    from nemo_basic.models.specs import language_layer_spec
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    small = language_config_from_hf(dict(vicuna, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                         num_key_value_heads=4, num_hidden_layers=1), seq_length=1024,
                                    use_cpu_initialization=True, bf16=True, params_dtype=torch.bfloat16)
    layer = build_module(language_layer_spec(normalization="RMSNorm"), config=small, layer_number=1)
    out["norm"] = f"{type(layer.input_layernorm).__module__}.{type(layer.input_layernorm).__name__}"
    softmax = layer.self_attention.core_attention.scale_mask_softmax
    out["softmax_kernel"] = softmax.is_kernel_available(None, 2, 4, 1024, 1024)
    print("RESULT " + json.dumps(out))
""")


def test_vicuna7b_config_builds_on_cuda_without_te(tmp_path):
    """NeMo's LlamaConfig with the GPU backend forced and neither TE nor apex present: the config
    builds (no 'apply_rope_fusion is not available'), with exactly the fusions this machine has,
    and the local spec's RMSNorm and softmax accept it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NEMO_BASIC_CPU_BACKEND="0")
    proc = subprocess.run([sys.executable, "-c", _GPU_BACKEND_BUILD, json.dumps(VICUNA_7B), str(port)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    # no CPU patch; only the import-time one for a process that sees no GPU
    assert out["cpu_backend"] is False and out["patches"] == ["unified_memory_build"] and out["te"] is False
    assert "LlamaConfig" in out["config_classes"]  # NeMo's, whose defaults turn every fusion on
    # neither TE nor apex here
    assert out["flags"] == expected(te=False, apex=False, compile_=out["compile"])
    assert out["tiny"] == {"use_cpu_initialization": False,
                           "flags": dict(out["flags"], gradient_accumulation_fusion=False)}  # no DDP main_grad there
    assert out["norm"] == "torch.nn.modules.normalization.RMSNorm"  # WrappedTorchNorm built it
    assert out["softmax_kernel"] is False
