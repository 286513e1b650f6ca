"""Shared gloo ranks for this folder's spawned tests: starting a rank (a fresh interpreter importing
torch and nemo_basic) costs more than the small tensors they reduce, so each world size is started
once and every test's call runs on it in turn (nemo_basic.testing.spawn.DistributedPool, which
restarts the ranks after a failure)."""
from pathlib import Path

import pytest

from nemo_basic.testing.spawn import DistributedPool

_HERE = Path(__file__).resolve().parent
_POOLS: dict[int, DistributedPool] = {}


@pytest.fixture(scope="session")
def spawn():
    """``spawn(fn, world_size, *args, timeout=...)``: as run_distributed, on this folder's shared ranks."""
    def run(fn, world_size, *args, timeout=600.0):
        if world_size not in _POOLS:
            _POOLS[world_size] = DistributedPool(world_size)
        return _POOLS[world_size].run(fn, *args, timeout=timeout)
    return run


def _close_pools():
    while _POOLS:
        _POOLS.popitem()[1].close()


def pytest_runtest_teardown(item, nextitem):
    # Idle ranks hold a few hundred MB each: give them back once this folder's tests are done.
    if nextitem is None or _HERE not in Path(nextitem.path).resolve().parents:
        _close_pools()


def pytest_sessionfinish(session, exitstatus):
    _close_pools()
