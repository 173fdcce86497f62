"""W4 (docs/design.md, Benchmark workloads): one maximum-likelihood training step of an
autoregressive MoL flow; W5 / C1: sampling that flow against its log_prob on the same batch.

fastflow's model (Triton kernels on a GPU) against the same model in plain PyTorch (dense
MADE, the mixture CDF's log-space formulas under autograd) in eager mode and under
torch.compile, and zuko's and nflows' affine MAFs with
the same MADE sizes where they are installed (skipped with a message otherwise), in one run:

    pytest bench/bench_flows.py --benchmark-enable --benchmark-group-by=group

Sizes: W4 on a GPU (D = 784, hidden [1024, 1024], K = 10, batch 256); on a CPU
D = 64, hidden [256, 256], K = 8, batch 256. W5 on a GPU (W4's model, batch 4096); C1 on a
CPU (D = 64, hidden [256, 256], K = 8, batch 4096). "tiny" when benchmarking is disabled.
"""

import contextlib

import pytest
import torch

import fastflow
from fastflow.cli.bench import (
    FLOW_SIZES,
    _nflows_maf,
    _train_step,
    _zuko_maf,
    flow_model,
    plain_pytorch,
)

from conftest import DEVICE, sync


def _cfg(size_name, batch_index):
    D, hidden, K = FLOW_SIZES[size_name][:3]
    return dict(features=D, hidden=hidden, components=K,
                batch=FLOW_SIZES[size_name][batch_index])


def _model_input(size_name, batch_index):
    cfg = _cfg(size_name, batch_index)
    gen = torch.Generator().manual_seed(0)
    return cfg, torch.randn(cfg["batch"], cfg["features"], generator=gen).to(DEVICE)


@pytest.fixture(scope="module")
def w4(size_name):
    return _model_input(size_name, 3)


def _fastflow_model(cfg):
    return flow_model(cfg["features"], cfg["hidden"], cfg["components"], DEVICE)


def _peer(variant, cfg):
    """zuko's or nflows' affine MAF with the same MADE sizes (skipped when not installed)."""
    name = variant.split("-")[0]
    build = {"zuko": _zuko_maf, "nflows": _nflows_maf}[name]
    flow = build(cfg["features"], cfg["hidden"], DEVICE)
    if flow is None:
        pytest.skip(f"{name} is not installed (the bench extra)")
    if name == "zuko":
        return flow, lambda: flow()
    return flow, lambda: flow


def _synced_step(loss_fn, params):
    step = _train_step(loss_fn, params)

    def synced():
        loss = step()
        sync()
        return loss

    return synced


@pytest.mark.parametrize("variant", ["fastflow", "torch-eager", "torch-compile", "zuko-maf",
                                     "nflows-maf"])
def test_w4_training_step(benchmark, w4, variant):
    benchmark.group = "W4 training step"
    cfg, x = w4
    fastflow.set_validate_args(False)
    with contextlib.ExitStack() as stack:
        stack.callback(fastflow.set_validate_args, True)
        if variant.endswith("maf"):
            flow, dist = _peer(variant, cfg)
            step = _synced_step(lambda: -dist().log_prob(x).mean(), flow.parameters())
        else:
            if variant != "fastflow":
                stack.enter_context(plain_pytorch())
            model = _fastflow_model(cfg)
            step = _synced_step(lambda: -model.log_prob(x).mean(), model.parameters())
            if variant == "torch-compile":
                step = torch.compile(step)
        step()  # warm-up: compilation stays out of the timings
        loss = benchmark(step)
        assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------
# W5 / C1: sampling against log_prob on the same model and batch
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def w5(size_name):
    return _model_input(size_name, 4)


@pytest.mark.parametrize("variant", [
    "fastflow-log_prob", "fastflow-sample", "fastflow-sample-d-pass",
    "zuko-maf-log_prob", "zuko-maf-sample", "nflows-maf-log_prob", "nflows-maf-sample",
])
def test_w5_sample_and_log_prob(benchmark, w5, variant):
    """fastflow samples in one pass (one kernel launch on a GPU); "-d-pass" is the
    straightforward algorithm of D network passes (what peers do), timed once: it is slow."""
    benchmark.group = "W5/C1 sample vs log_prob"
    cfg, x = w5
    n = cfg["batch"]
    fastflow.set_validate_args(False)
    try:
        if variant.startswith(("zuko", "nflows")):
            _, dist = _peer(variant, cfg)
            dist = dist()
            if variant.endswith("log_prob"):
                run = dist.log_prob
            elif variant.startswith("zuko"):
                def run(_):
                    return dist.sample((n,))
            else:
                def run(_):
                    return dist.sample(n)
        else:
            model = _fastflow_model(cfg)
            if variant.endswith("log_prob"):
                run = model.log_prob
            elif variant.endswith("d-pass"):
                for t in model.transforms:
                    t.one_pass = False  # the straightforward D network passes

                def run(_):
                    return model.sample(n)
            else:
                def run(_):
                    return model.sample(n)

        def timed():
            with torch.no_grad():
                out = run(x)
            sync()
            return out

        if DEVICE.type == "cuda" or not variant.endswith("d-pass"):
            timed()  # warm-up (compilation); the CPU D-pass is too slow to run twice
        if variant.endswith("d-pass"):
            out = benchmark.pedantic(timed, rounds=1, iterations=1)
        else:
            out = benchmark(timed)
        assert torch.isfinite(out).all()
    finally:
        fastflow.set_validate_args(True)
