"""A configuration error costs no Megatron import: the recipe says what is wrong in ~2 s."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_RUN = """
import runpy, sys
sys.argv = ["basic_pretrain.py", *{args!r}]
try:
    runpy.run_path("examples/basic_pretrain.py", run_name="__main__")
except SystemExit as e:
    print("EXIT", e.code, "megatron.core" in sys.modules, "nemo" in sys.modules)
"""


@pytest.mark.parametrize("args,message", [
    (["trainer.max_steps=-3"], "trainer.max_steps = -3 is invalid"),
    (["data.path=/nonexistent/shards"], "data.path = '/nonexistent/shards' is invalid"),
])
def test_config_errors_come_before_megatron(args, message):
    out = subprocess.run([sys.executable, "-c", _RUN.format(args=args)], capture_output=True, text=True,
                         cwd=str(REPO), timeout=300)
    assert message in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "EXIT 2 False False", out.stdout[-2000:]
