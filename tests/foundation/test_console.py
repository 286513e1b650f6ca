"""`nemo_basic.console`: what reaches the screen at each verbosity, and from which rank."""
from __future__ import annotations

import io

import pytest

from nemo_basic import console

NEMO_INFO = "[NeMo I 2026-12-07 17:47:46 megatron_init:451] Rank 0 has data parallel group : [0]\n"
TABLE = "  | Name   | Type | Params | Mode \n----------------------------------------\n0 | module | DDP  | 356 K  | train\n"
OURS = "[stage 1] step 1/2 | lm loss 6.9197\n"
TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nValueError: bad\n'
HARMLESS = "FutureWarning: The pynvml package is deprecated. Please install nvidia-ml-py instead.\n"


@pytest.fixture
def screen(monkeypatch):
    import torch.distributed

    for var in ("NEMO_BASIC_CONSOLE", "RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    # an earlier test of the session may have left a process group up: the launcher's variables decide
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    out = io.StringIO()
    return out, console.FilteredStream(out, "stdout")


def test_default_keeps_only_what_the_user_needs(screen):
    out, stream = screen
    for text in (NEMO_INFO, "\n", TABLE, OURS, HARMLESS, TRACEBACK):
        stream.write(text)
    assert out.getvalue() == OURS + TRACEBACK
    assert stream.kept == [NEMO_INFO, "\n", TABLE, HARMLESS]


def test_verbose_prints_everything_but_the_harmless(screen, monkeypatch):
    out, stream = screen
    monkeypatch.setenv("NEMO_BASIC_CONSOLE", "")  # restored after the test
    console.set_verbose(True)  # run.verbose=true
    for text in (NEMO_INFO, TABLE, OURS, HARMLESS):
        stream.write(text)
    assert out.getvalue() == NEMO_INFO + TABLE + OURS


def test_other_ranks_stdout_is_kept_but_their_errors_are_shown(screen, monkeypatch):
    out, stream = screen
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's launcher: a second process on this node
    assert console.rank() == 1
    err_out = io.StringIO()
    err = console.FilteredStream(err_out, "stderr")
    stream.write(OURS)
    err.write(TRACEBACK)
    assert out.getvalue() == "" and err_out.getvalue() == TRACEBACK


def test_say_prints_on_rank_zero_only(screen, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    console.say("hello")
    monkeypatch.setenv("RANK", "3")
    console.say("from rank 3")
    assert capsys.readouterr().out == "[nemo_basic] hello\n"
