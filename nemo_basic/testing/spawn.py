"""Run a function on N real processes joined by a gloo process group, and collect what each returns.

Distributed tests must exercise the real collectives, not a mock: every rank is a separate
`spawn`-ed interpreter, as under torchrun. Results travel back through a queue, serialised with
torch.save, so return plain Python objects and CPU tensors.
"""
from __future__ import annotations

import io
import os
import queue as queue_module
import time
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, init_group: bool) -> None:
    # The variables torchrun sets; with GROUP_RANK too, Lightning takes the processes as launched
    # externally (TorchElasticEnvironment) instead of re-launching the script.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), GROUP_RANK="0",
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # no oversubscription
    try:
        if init_group:
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Serialise here: tensors passed through the queue as shared memory would vanish with this
        # process if it exits before the parent has read them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report every failure to the parent, including assertion errors
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0,
                    init_group: bool = True) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank.

    With ``init_group=False`` the processes only get torchrun's environment variables and ``fn``
    (e.g. a Lightning trainer) initialises the process group itself.
    ``fn`` must be importable by module path (spawned interpreters re-import it). Raises
    RuntimeError carrying the remote traceback if any rank fails, and TimeoutError if a rank hangs.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, init_group), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in results]
                if dead:  # a rank died without reporting (killed, os._exit, segfault)
                    errors += [f"--- rank {r} --- exited with code {code} without a result" for r, code in dead]
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run of {fn.__name__} timed out after {timeout}s")
                continue
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError(f"distributed run of {fn.__name__} failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
