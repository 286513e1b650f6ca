"""Helpers shared by the test-suite and parity scripts (real multi-process runs on CPU)."""
from nemo_basic.testing.spawn import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
