"""Host time of fastflow's op layer: checks, autograd Function, custom-op dispatch.

    python bench/host_overhead.py [--calls 2000]

Times forward + backward of ``fastflow.mixture_cdf`` on tiny CPU tensors with the kernels
replaced by functions that only allocate their outputs, so what remains is the Python and
dispatch work that runs on the host for every call on any device; beside it, the same
autograd pattern through two plain PyTorch multiplies. Min of 5 rounds, microseconds.
"""

from __future__ import annotations

import argparse
import time
import types
from unittest import mock

import torch

import fastflow
from fastflow import _registry


def _allocating_impl(shape, K):
    def fwd(*_):
        return torch.empty(shape), torch.empty(shape)

    def bwd(*_):
        return [torch.empty(shape), *(torch.empty(*shape, K) for _ in range(3))]

    return types.SimpleNamespace(mixture_cdf_fwd=fwd, mixture_cdf_bwd=bwd)


def measure(calls: int) -> dict[str, float]:
    shape, K = (4, 3), 2
    x = torch.randn(shape, requires_grad=True)
    params = [torch.randn(*shape, K, requires_grad=True) for _ in range(3)]
    impl = _allocating_impl(shape, K)

    def op_layer():
        y, lad = fastflow.mixture_cdf(x, *params, kind="logistic", output="logit",
                                      validate_args=False)
        torch.autograd.grad((y + lad).sum(), (x, *params))

    def plain():
        y, lad = x * 1.0, x * 2.0
        torch.autograd.grad((y + lad).sum(), (x,))

    best = {}
    with mock.patch.object(_registry, "_impl", lambda t: (impl, impl)):
        for _ in range(5):
            for name, fn in (("fastflow op layer", op_layer), ("plain autograd", plain)):
                for _ in range(20):
                    fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                us = (time.perf_counter() - t0) / calls * 1e6
                best[name] = min(best.get(name, us), us)
    return best


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)
    best = measure(args.calls)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, "
          "us per call (min of 5 rounds)")
    for name, us in best.items():
        print(f"{name}: {us:.1f}")
    return best


if __name__ == "__main__":
    main()
