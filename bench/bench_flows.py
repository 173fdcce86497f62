"""W4 (DESIGN section 5): one maximum-likelihood training step of an autoregressive MoL flow;
W5 / C1: sampling that flow against its log_prob on the same batch.

fastflow's model (Triton kernels on a GPU) against the same model on the plain-PyTorch
reference path in eager mode and under torch.compile, and zuko's affine MAF with the same MADE
sizes where zuko is installed (skipped with a message otherwise), all in one run:

    pytest bench/bench_flows.py --benchmark-enable --benchmark-group-by=group

Sizes: W4 on a GPU (D = 784, hidden [1024, 1024], K = 10, batch 256); on a CPU
D = 64, hidden [256, 256], K = 8, batch 256. W5 on a GPU (W4's model, batch 4096); C1 on a
CPU (D = 64, hidden [256, 256], K = 8, batch 4096). "tiny" when benchmarking is disabled.
"""

import pytest
import torch

import fastflow
from fastflow.distributions import StandardNormal
from fastflow.nn import AutoregressiveMixtureFlow, Flow

from conftest import DEVICE, sync

W4_SIZES = {
    "full": dict(features=784, hidden=[1024, 1024], components=10, batch=256),
    "cpu": dict(features=64, hidden=[256, 256], components=8, batch=256),
    "tiny": dict(features=8, hidden=[32, 32], components=3, batch=16),
}


@pytest.fixture(scope="module")
def w4(size_name):
    cfg = W4_SIZES[size_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], cfg["features"], generator=gen).to(DEVICE)
    return cfg, x


def _fastflow_model(cfg):
    """W4 and W5: one autoregressive mixture-of-logistics flow layer over a Gaussian base."""
    torch.manual_seed(0)
    return Flow([AutoregressiveMixtureFlow(cfg["features"], cfg["components"], cfg["hidden"],
                                           output="logit", seed=0)],
                StandardNormal(cfg["features"])).to(DEVICE)


def _step_fn(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        loss = -model.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        return loss.detach()

    return step


@pytest.mark.parametrize("variant", ["fastflow", "torch-eager", "torch-compile", "zuko-maf"])
def test_w4_training_step(benchmark, w4, variant, monkeypatch):
    benchmark.group = "W4 training step"
    cfg, x = w4
    fastflow.set_validate_args(False)
    try:
        if variant == "zuko-maf":
            zuko = pytest.importorskip("zuko", reason="zuko is not installed (the bench extra)")
            flow = zuko.flows.MAF(cfg["features"], transforms=1,
                                  hidden_features=cfg["hidden"]).to(DEVICE)
            opt = torch.optim.SGD(flow.parameters(), lr=1e-4)

            def step():
                loss = -flow().log_prob(x).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sync()
                return loss.detach()
        else:
            if variant != "fastflow":
                monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
            model = _fastflow_model(cfg)
            step = _step_fn(model, x)
            if variant == "torch-compile":
                step = torch.compile(step)
        step()  # warm-up: compilation stays out of the timings
        loss = benchmark(step)
        assert torch.isfinite(loss)
    finally:
        fastflow.set_validate_args(True)


# --------------------------------------------------------------------------------------------
# W5 / C1: sampling against log_prob on the same model and batch
# --------------------------------------------------------------------------------------------
W5_SIZES = {
    "full": dict(features=784, hidden=[1024, 1024], components=10, batch=4096),
    "cpu": dict(features=64, hidden=[256, 256], components=8, batch=4096),  # C1
    "tiny": dict(features=8, hidden=[32, 32], components=3, batch=16),
}


@pytest.fixture(scope="module")
def w5(size_name):
    cfg = W5_SIZES[size_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], cfg["features"], generator=gen).to(DEVICE)
    return cfg, x


def _zuko_maf(cfg):
    zuko = pytest.importorskip("zuko", reason="zuko is not installed (the bench extra)")
    torch.manual_seed(0)
    return zuko.flows.MAF(cfg["features"], transforms=1, hidden_features=cfg["hidden"]).to(DEVICE)


@pytest.mark.parametrize("variant", [
    "fastflow-log_prob", "fastflow-sample", "fastflow-sample-d-pass",
    "zuko-maf-log_prob", "zuko-maf-sample",
])
def test_w5_sample_and_log_prob(benchmark, w5, variant):
    """fastflow samples in one pass (one kernel launch on a GPU); "-d-pass" is the
    straightforward algorithm of D network passes (what peers do), timed once: it is slow."""
    benchmark.group = "W5/C1 sample vs log_prob"
    cfg, x = w5
    n = cfg["batch"]
    fastflow.set_validate_args(False)
    try:
        if variant.startswith("zuko"):
            flow = _zuko_maf(cfg)
            dist = flow()
            run = dist.log_prob if variant.endswith("log_prob") else (lambda _: dist.sample((n,)))
        else:
            model = _fastflow_model(cfg)
            if variant.endswith("log_prob"):
                run = model.log_prob
            elif variant.endswith("d-pass"):
                # Gradients on: the modules take the D-pass route, as autograd needs.
                def run(_):
                    return model.rsample(n).detach()
            else:
                def run(_):
                    return model.sample(n)

        def timed():
            with torch.no_grad() if not variant.endswith("d-pass") else torch.enable_grad():
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
