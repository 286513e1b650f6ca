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


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux: ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port for a rendezvous (MASTER_PORT) that a process binds a while after this returns.

    Drawn below the kernel's ephemeral range: a port the kernel picks (``bind(0)``) lies in that
    range, where other jobs' outgoing connections (gloo pairs, TCPStore clients) are also given
    ports, and one of them can take it before the rendezvous binds it (EADDRINUSE, seen in CI with
    two recipe runs at once). Drawn with os.urandom, so forked processes do not draw alike."""
    import random

    low = _ephemeral_low()
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # nothing free down there: any port
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


# -- many calls on one set of ranks ----------------------------------------------------------------
# Starting a rank (a fresh interpreter importing torch, Megatron and NeMo) costs far more than the
# tiny models the tests run in it; a pool pays it once for every call made on the same world size.


def _reset_between_calls() -> None:
    """Undo the process-wide state a call may leave behind, so that the next starts as a fresh rank would."""
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    calculator = sys.modules.get("megatron.core.num_microbatches_calculator")
    if calculator is not None:
        calculator.destroy_num_microbatches_calculator()


def _pool_worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), GROUP_RANK="0",
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    threads = max(1, (os.cpu_count() or 1) // world_size)  # no oversubscription
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    except BaseException:
        results.put((None, rank, "error", traceback.format_exc()))
        return
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            call, fn, args = task
            torch.set_num_threads(threads)  # a call may have changed it; each starts as run_distributed's would
            try:
                result = fn(rank, world_size, *args)
                buffer = io.BytesIO()  # serialised here, as in _worker
                torch.save(result, buffer)
                results.put((call, rank, "ok", buffer.getvalue()))
            except BaseException:
                results.put((call, rank, "error", traceback.format_exc()))
            finally:
                _reset_between_calls()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class DistributedPool:
    """``world_size`` gloo ranks, started once, that run ``fn(rank, world_size, *args)`` call after call.

    ``run`` returns and raises exactly as ``run_distributed`` does. Between calls each rank tears
    down Megatron's model-parallel state and micro-batch calculator (a call must not rely on
    anything else a previous call left behind). After a failure or a timeout the ranks are killed
    (a surviving rank may be blocked in a collective its failed peer never joins) and the next
    ``run`` starts fresh ones. Only for functions that use the default process group as started
    here (``init_group=True`` in ``run_distributed``'s terms).
    """

    def __init__(self, world_size: int, timeout: float = 600.0):
        self.world_size = world_size
        self.timeout = timeout
        self._procs: list = []
        self._calls = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        port = free_port()
        self._procs = [ctx.Process(target=_pool_worker, args=(r, self.world_size, port, self._tasks[r], self._results),
                                   daemon=False) for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable, *args: Any, timeout: float | None = None) -> list:
        if not self._procs:
            self._start()
        self._calls += 1
        call = self._calls
        for q in self._tasks:
            q.put((call, fn, args))
        results: dict[int, Any] = {}
        errors = []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while len(results) < self.world_size and not errors:
                try:
                    got, rank, status, payload = self._results.get(timeout=1.0)
                except queue_module.Empty:
                    dead = [(r, p.exitcode) for r, p in enumerate(self._procs)
                            if p.exitcode is not None and r not in results]
                    if dead:
                        errors += [f"--- rank {r} --- exited with code {code} without a result" for r, code in dead]
                    elif time.monotonic() > deadline:
                        raise TimeoutError(f"distributed run of {fn.__name__} timed out after "
                                           f"{self.timeout if timeout is None else timeout}s")
                    continue
                if status == "ok" and got == call:
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                elif status != "ok":
                    errors.append(f"--- rank {rank} ---\n{payload}")
        except BaseException:
            self.close(kill=True)
            raise
        if errors:
            self.close(kill=True)
            raise RuntimeError(f"distributed run of {fn.__name__} failed:\n" + "\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        """Stop the ranks: ask them to exit (not with ``kill``: after a failure), kill any left after 5 s."""
        if not self._procs:
            return
        if not kill:
            for q in self._tasks:
                q.put(None)
        # Every result is in by now: a rank slow to exit (interpreter teardown of NeMo and Megatron
        # can take tens of seconds on a loaded machine) holds nothing worth waiting for.
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []

    def __enter__(self) -> "DistributedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
