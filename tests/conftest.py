"""Shared fixtures: seeding, NaN-filled allocations, backends and devices.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
the kernels are first imported, which is why it is set here, at collection time.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.device(...) as a context manager recognises factory functions from a set it builds
# once, on first use: use it now, with the real torch.empty, before _nan_filled_empty
# replaces that for a test (a set built then would hold the replacement, and every later
# `with torch.device("meta")` would allocate torch.empty's tensors on the CPU).
with torch.device("meta"):
    torch.empty(0)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _nan_filled_empty(monkeypatch):
    """Uninitialised float memory is NaN, so an output a kernel forgets to write fails."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point() and t.device.type != "meta" and t.numel():
            with torch.no_grad():  # an empty(..., requires_grad=True) leaf is filled too
                t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda s, *a, **k: fill(new_empty(s, *a, **k)))


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs: for tests of many small ops, where threads
    cost more than they give (and the interpreted kernels are single-threaded anyway)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """Run the test through one backend: the PyTorch reference or the Triton kernels
    (compiled on a GPU, interpreted on the CPU)."""
    monkeypatch.setenv("FASTFLOW_BACKEND", request.param)
    return request.param


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    return "triton"


@pytest.fixture
def device():
    return DEVICE
