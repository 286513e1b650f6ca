"""Runs the recipe's command line (``main(argv)`` of ``examples/basic_pretrain.py`` then of
``examples/basic_finetune.py``) for several runs from one process, two runs at a time.

    python tests/convert/_recipe_forks.py JOBS.json

Why: importing NeMo costs ~24 s of CPU, the 2-step runs of a tiny model ~5 s each. This process
imports what the examples import once (the console filter first, as the examples do), then forks
one child per stage: each child is a fresh copy of that state and runs the example's ``main`` with
its own arguments, MASTER_PORT and log file, exactly as ``python examples/basic_pretrain.py ARGS``
would after its imports; stage 2 of a run starts when its stage 1 exited 0. JOBS.json:
``{"parallel": 2, "results": PATH, "runs": [{"name", "log", "argv1", "argv2"}]}``; the results file
gets ``{name: {"rc1", "rc2", "seconds1", "seconds2"}}``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_entry = None  # examples/_entry.py, imported by _main


def _child(stage: int, doc: str, argv: list, log: str, port: int) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["MASTER_PORT"] = str(port)
    rc = 1
    try:
        rc = _entry.run(stage, doc, argv, console=False)  # the console filter is already on
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)


def _main(jobs_file: str) -> None:
    with open(jobs_file) as f:
        jobs = json.load(f)
    sys.path.insert(0, os.path.join(REPO, "examples"))
    global _entry
    import _entry
    import basic_finetune
    import basic_pretrain

    _entry.install_console()
    import nemo_basic  # noqa: F401  (first: the CPU backend patches)
    from nemo_basic import compat

    compat.apply_nemo()
    from nemo import lightning  # noqa: F401
    from nemo.collections import llm  # noqa: F401

    from nemo_basic.recipes import train  # noqa: F401
    from nemo_basic.testing import free_port

    results = {r["name"]: {} for r in jobs["runs"]}
    pending, running = list(jobs["runs"]), {}

    def start(run: dict, stage: int) -> None:
        port = free_port()
        pid = os.fork()
        if pid == 0:
            _child(stage, (basic_pretrain if stage == 1 else basic_finetune).__doc__, run[f"argv{stage}"],
                   f"{run['log']}.stage{stage}.txt", port)
        running[pid] = (run, stage, time.time())

    while pending or running:
        while pending and len(running) < jobs.get("parallel", 2):
            start(pending.pop(0), 1)
        pid, status = os.wait()
        run, stage, t0 = running.pop(pid)
        rc = os.waitstatus_to_exitcode(status)
        results[run["name"]].update({f"rc{stage}": rc, f"seconds{stage}": round(time.time() - t0, 1)})
        if stage == 1 and rc == 0:
            start(run, 2)
    with open(jobs["results"], "w") as f:
        json.dump(results, f, indent=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # NeMo's interpreter teardown takes seconds and has nothing left to do here


if __name__ == "__main__":  # a multiprocessing "spawn" child re-imports this file: it must not run again
    _main(sys.argv[1])
