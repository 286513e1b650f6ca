"""scripts/gpu_selftest.py in --cpu mode: the JSON report's structure, every check that runs without
CUDA passes against its independent reference, and the CUDA-only parts are reported as skipped
with a reason (the GPU run itself needs a GPU: see the script's docstring)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_selftest.py"
CHECKS = ["imports", "lse_attention", "basic_losses", "config_rejections", "recipe", "proxy"]

pytestmark = pytest.mark.gpu_path


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest") / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=str(out.parent))
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_mode_report(cpu_run):
    proc, report = cpu_run
    by_name = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert [c["number"] for c in report["checks"]] == list(range(1, 7))
    assert report["mode"] == "cpu" and report["schema"] == 1
    for c in report["checks"]:
        assert c["status"] in ("PASS", "FAIL", "SKIP")
        assert isinstance(c["numbers"], dict) and isinstance(c["failures"], list)
        assert (c["status"] == "FAIL") == bool(c["failures"]), c
        assert any(line.startswith(f"{c['status']}  {c['number']} {c['name']}") for line in proc.stdout.splitlines())
    failed = [c["name"] for c in report["checks"] if c["status"] == "FAIL"]
    assert proc.returncode == report["exit_code"] == (1 if failed else 0)
    assert report["counts"] == {s: sum(c["status"] == s for c in report["checks"]) for s in ("PASS", "FAIL", "SKIP")}

    # the versions come first, before any check line
    lines = proc.stdout.splitlines()
    first_check = next(i for i, line in enumerate(lines) if line.startswith(("PASS", "FAIL", "SKIP")))
    versions = [i for i, line in enumerate(lines) if line.startswith("versions: torch ")]
    assert versions and versions[0] < first_check
    assert f"megatron_core {report['environment']['versions']['megatron_core']}" in lines[versions[0]]

    env = report["environment"]
    assert env["versions"]["torch"] and env["versions"]["megatron_core"] and env["versions"]["nemo"]
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" in env["env"] and env["matmul_allow_tf32"] in (True, False)
    assert env["cuda_available"] is False  # --cpu hides any GPU from the checks

    # Every check runs on a CPU (the CUDA-only parts of each are skipped) and must pass.
    for name in CHECKS:
        assert by_name[name]["status"] == "PASS", (name, by_name[name]["failures"], by_name[name].get("traceback"))
    rejections = by_name["config_rejections"]["numbers"]
    assert set(rejections) == {"context_parallel", "virtual_pipeline", "fp8_dot_product_attention",
                               "fp8_multi_head_attention"}
    for label, row in rejections.items():
        assert row["basic_on"].startswith("BasicConfigError") and row["basic_off"] == "accepted", (label, row)

    # The CUDA-only parts are named, with the reason, not silently left out.
    for name in ("lse_attention", "basic_losses", "recipe", "proxy"):
        skipped = by_name[name]["skipped_parts"]
        assert skipped and all(p["reason"] for p in skipped), name


@pytest.mark.slow
def test_cpu_mode_numbers(cpu_run):
    """The figures behind the PASSes, read independently of the script's own thresholds."""
    _, report = cpu_run
    by_name = {c["name"]: c["numbers"] for c in report["checks"]}
    cases = by_name["lse_attention"]["cases"]
    assert {"d64", "d32", "qkv_view_d64", "gqa2_d64"} <= set(cases)
    for row in cases.values():  # fp32 CPU flash kernel vs float64 eager attention
        assert row["shapes_ok"] and row["lse_dtype"] == "torch.float32"
        assert max(row["err_out"], row["err_lse"], row["err_dq"], row["err_dk"], row["err_dv"]) < 1e-4, row
    assert cases["qkv_view_d64"]["strides_q"][-1] == 1 and cases["qkv_view_d64"]["strides_q"][-2] != 64
    assert by_name["lse_attention"]["gqa_native"] == "PASS"

    local = by_name["basic_losses"]["local"]
    assert local["core_attention"].endswith(".DotProductAttention")
    assert local["das_float64"] > 0 and local["sds_float64"] > 0
    assert local["das"] == pytest.approx(local["das_float64"], rel=1e-5)
    assert local["sds"] == pytest.approx(local["sds_float64"], rel=1e-5)

    recipe = by_name["recipe"]["fp32"]
    assert recipe["rc"] == 0 and recipe["steps_done"] == 3
    assert [r["step"] for r in recipe["rows"]] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in recipe["rows"] for k in ("lm_loss", "basic_das_loss", "basic_sds_loss"))
    calls = recipe["probe"]["calls"]
    assert calls and not any(c["fp8_enabled"] for c in calls)
    assert {c["layer"].rsplit(".", 1)[-1] for c in calls} == {"0", "1", "2", "3"}  # all 4 decoder layers seen

    proxy = by_name["proxy"]
    assert proxy["sizes"]["hidden"] == 256 and proxy["sizes"]["layers"] == 2
    assert set(proxy["sync_ops"]) == {"on", "off"} and all(v > 0 for v in proxy["step_ms_median"].values())
    # L_sds's GEMMs with bf16 operands, before issue 25 (hi/lo: 5 products) and now (3)
    assert proxy["old_vs_new"]["sds_flops_new_over_old"] == pytest.approx(3 / 5)


def _fake_registry(selftest, monkeypatch, seconds: dict):
    """The real orchestration (GPU mode) over stand-in checks that only record when they ran."""
    import types

    ran = []

    def fake_worker_group(names, ctx, on_result, environment):
        ran.append(("worker", list(names)))
        for n in names:
            selftest._DEADLINE[0] -= seconds.get(n, 0)  # as if the check took this long
            on_result(dict(selftest.skipped(n, ""), status="PASS", summary="ran"))

    def fake_run_check(c, ctx):
        ran.append(("parent", c.name))
        selftest._DEADLINE[0] -= seconds.get(c.name, 0)
        return dict(selftest.skipped(c.name, ""), status="PASS", summary="ran")

    monkeypatch.setattr(selftest, "run_worker_group", fake_worker_group)
    monkeypatch.setattr(selftest, "run_check", fake_run_check)
    monkeypatch.setattr(selftest, "parent_environment", lambda: {
        "versions": dict.fromkeys(selftest.DISTRIBUTIONS), "python": "3", "platform": "p", "cpus": 1,
        "git_commit": None, "torch_cuda": "13.0", "nvidia_smi": None, "kit": None})
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return ran


def test_gpu_mode_runs_checks_in_order_within_the_budget(tmp_path, monkeypatch, capsys):
    """On a GPU the checks run one after the other in the registry's order (worker checks 1-4 in
    one worker, the recipe, then the proxy in another), and once --budget is spent the rest SKIP."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_selftest_under_test", SCRIPT)
    selftest = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, selftest)  # its dataclasses look themselves up there
    spec.loader.exec_module(selftest)
    assert [c.name for c in sorted(selftest.REGISTRY.values(), key=lambda c: c.number)] == CHECKS

    ran = _fake_registry(selftest, monkeypatch, {})
    assert selftest.main(["--out", str(tmp_path / "a.json"), "--budget", "450"]) == 0
    assert ran == [("worker", CHECKS[:4]), ("parent", "recipe"), ("worker", ["proxy"])]
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["budget_s"] == 450 and [c["status"] for c in report["checks"]] == ["PASS"] * 6

    # the first four checks spend the budget: the recipe (needs >= 60 s) is skipped by name
    ran = _fake_registry(selftest, monkeypatch, {"basic_losses": 420})
    selftest._DEADLINE[0] = float("inf")
    assert selftest.main(["--out", str(tmp_path / "b.json"), "--budget", "450"]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    status = {c["name"]: (c["status"], c.get("reason")) for c in report["checks"]}
    assert status["recipe"] == ("SKIP", "out of the 450 s budget") and ("parent", "recipe") not in ran
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("nemo_basic GPU self-test (gpu mode, budget 450 s)")
    assert out.splitlines()[1].startswith("python 3 on p") and out.splitlines()[2].startswith("versions: torch None")
