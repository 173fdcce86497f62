"""Benchmark set-up: workload sizes by device and mode.

Sizes: "full" on a GPU (W1: N = 2^24 elements; docs/design.md, Benchmark workloads), "cpu" on
a CPU (about a minute for the whole file), "tiny" whenever benchmarking is disabled (CI runs
the code once so it cannot rot). Override with FASTFLOW_BENCH_SIZE=tiny|cpu|full.
"""

import os

import pytest
import torch

from fastflow.cli.bench import OP_SIZES

SIZES = OP_SIZES
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_configure(config):
    if not HAS_CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def size_name(request):
    name = os.environ.get("FASTFLOW_BENCH_SIZE")
    if name is None:
        opt = request.config.getoption
        if opt("benchmark_disable", False) and not opt("benchmark_enable", False):
            name = "tiny"
        else:
            name = "full" if HAS_CUDA else "cpu"
    if name not in SIZES:
        raise ValueError(f"FASTFLOW_BENCH_SIZE must be one of {tuple(SIZES)}, got {name!r}")
    return name


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()
