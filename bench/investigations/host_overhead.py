"""Host time of fastflow's Python layers: the part of each call that a GPU does not speed up.

    python bench/investigations/host_overhead.py [--calls 1000] [--rounds 7]

On tiny CPU tensors, where the arithmetic is negligible and what remains is the Python,
autograd and dispatch work that every call costs on any device:

- op: forward + backward of ``fastflow.mixture_cdf``, beside the same autograd pattern through
  two plain multiplies;
- dispatch: one forward op call through ``torch.ops.fastflow`` (the registered custom op) and
  directly, as the autograd Functions call it in plain eager mode;
- W4: one training step (SGD) of W4's model at tiny sizes (D = 4, hidden [8, 8], K = 2,
  batch 2): fastflow on its GPU code path (the GPU's MADE routes, the Triton launchers run
  with their kernels replaced by no-ops), the same model in plain PyTorch (the benchmark's
  torch-eager baseline, ``benchmark.plain_pytorch``), and zuko's and nflows' affine MAF
  where installed.

Triton's own launch and the CUDA driver are not counted. A W4 step on a GPU is host-bound
when its host time exceeds its kernels' time, and then these ratios are what the benchmark
sees. Variants take turns; min over rounds, microseconds per call.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock

import torch
from fastflow.kernels import mixture_cdf as cdf_kernels

import fastflow
from fastflow.cli import bench as benchmark
from fastflow.ops import core, dispatch

TINY = (4, [8, 8], 2, 2)  # features, hidden, components, batch


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def gpu_code_path():
    """fastflow's GPU route on CPU tensors: launchers and MADE routes as on a GPU, no-op
    kernels, input checks off (as in ``fastflow bench``)."""
    with (benchmark.no_input_checks(),
          mock.patch.object(dispatch, "use_triton", lambda t: True),
          mock.patch.object(cdf_kernels, "_mixture_cdf_fwd_kernel", _NoLaunch()),
          mock.patch.object(cdf_kernels, "_mixture_cdf_bwd_kernel", _NoLaunch()),
          mock.patch.dict(dispatch.CPU_ROUTE, dispatch.GPU_ROUTE)):
        yield


@contextlib.contextmanager
def plain_model():
    """The torch-eager baseline of ``fastflow bench`` (``benchmark.plain_pytorch``)."""
    with benchmark.no_input_checks(), benchmark.plain_pytorch():
        yield


def op_variants():
    shape, K = (4, 3), 2
    x = torch.randn(shape, requires_grad=True)
    params = [torch.randn(*shape, K, requires_grad=True) for _ in range(3)]

    def op_layer():
        y, lad = fastflow.mixture_cdf(x, *params, kind="logistic", output="logit",
                                      validate_args=False)
        torch.autograd.grad((y + lad).sum(), (x, *params))

    def plain():
        y, lad = x * 1.0, x * 2.0
        torch.autograd.grad((y + lad).sum(), (x,))

    return {"fastflow op layer": (op_layer, gpu_code_path),
            "plain autograd": (plain, contextlib.nullcontext)}


def dispatch_variants():
    """One forward op call with no-op kernels, through the dispatcher and directly."""
    shape, K = (4, 3), 2
    x = torch.randn(shape)
    params = [torch.randn(*shape, K) for _ in range(3)]
    args = (x, *params, "logistic", "logit")

    def dispatched():
        with torch.no_grad():
            torch.ops.fastflow.mixture_cdf_fwd(*args)

    def direct():
        with torch.no_grad():
            core.call("mixture_cdf_fwd", *args)

    return {"torch.ops.fastflow": (dispatched, gpu_code_path),
            "direct (ops.core.call)": (direct, gpu_code_path)}


def w4_variants():
    D, hidden, K, batch = TINY
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, ctx in (("fastflow", gpu_code_path), ("torch-eager", plain_model)):
        model = benchmark.flow_model(D, hidden, K, "cpu")
        out[name] = (benchmark._train_step(lambda m=model: -m.log_prob(x).mean(),
                                           model.parameters()), ctx)
    zuko = benchmark._zuko_maf(D, hidden, "cpu")
    if zuko is not None:
        out["zuko-maf"] = (benchmark._train_step(lambda: -zuko().log_prob(x).mean(),
                                                 zuko.parameters()), contextlib.nullcontext)
    nflows = benchmark._nflows_maf(D, hidden, "cpu")
    if nflows is not None:
        out["nflows-maf"] = (benchmark._train_step(lambda: -nflows.log_prob(x).mean(),
                                                   nflows.parameters()), contextlib.nullcontext)
    return out


def measure(variants: dict, calls: int, rounds: int) -> dict[str, float]:
    """{name: min over rounds of microseconds per call}; the variants take turns."""
    best = {}
    for _ in range(rounds):
        for name, (fn, ctx) in variants.items():
            with ctx():
                for _ in range(max(1, calls // 20)):
                    fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                us = (time.perf_counter() - t0) / calls * 1e6
            best[name] = min(best.get(name, us), us)
    return best


def main(argv=None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads would only add noise
    try:
        with torch.random.fork_rng():  # the inputs are random, the models seeded
            return _report(args)
    finally:
        torch.set_num_threads(threads)


def _report(args) -> dict[str, dict[str, float]]:
    print(f"torch {torch.__version__}, 1 thread; us per call "
          f"(min of {args.rounds} rounds of {args.calls})")
    results = {}
    tables = (("op: forward + backward", op_variants(), "fastflow op layer"),
              ("dispatch: one forward op call", dispatch_variants(), "direct (ops.core.call)"),
              ("W4: training step at tiny sizes", w4_variants(), "fastflow"))
    for title, variants, ref in tables:
        best = measure(variants, args.calls, args.rounds)
        print(f"\n{title}\n")
        print(f"| variant | us per call | / {ref} |\n| --- | --- | --- |")
        for name, us in best.items():
            print(f"| {name} | {us:.1f} | {us / best[ref]:.2f} |")
        results[title.split(":")[0]] = best
    return results


if __name__ == "__main__":
    main()
