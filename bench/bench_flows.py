"""W4 (DESIGN section 5): one maximum-likelihood training step of an autoregressive MoL flow.

fastflow's model (Triton kernels on a GPU) against the same model on the plain-PyTorch
reference path in eager mode and under torch.compile, and zuko's affine MAF with the same MADE
sizes where zuko is installed (skipped with a message otherwise), all in one run:

    pytest bench/bench_flows.py --benchmark-enable --benchmark-group-by=group

Sizes: W4 on a GPU (D = 784, hidden [1024, 1024], K = 10, batch 256); on a CPU
D = 64, hidden [256, 256], K = 8, batch 256; "tiny" when benchmarking is disabled.
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
