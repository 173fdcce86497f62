"""W1-W3 (docs/design.md, Benchmark workloads): the mixture-CDF op against the same
computation in plain PyTorch eager and under torch.compile, and W1 against a device copy of the
same bytes.

    pytest bench --benchmark-enable                      # CPU sizes, or full size on a GPU
    pytest bench --benchmark-enable --benchmark-group-by=group --benchmark-sort=mean

Each group times the variants of one workload in one run; compare within a group only.
"""

import pytest
import torch

import fastflow
from fastflow.ops import mixture_inverse
from fastflow.reference import naive

from conftest import sync

KIND, OUTPUT = "logistic", "logit"


def _bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _reference_forward(x, logits, loc, log_scale):
    return naive.forward(x, logits, loc, log_scale, KIND, OUTPUT)


def _reference_inverse(y, logits, loc, log_scale):
    return naive.inverse_fixed(y, logits, loc, log_scale, KIND, OUTPUT,
                               mixture_inverse.BISECT_STEPS, mixture_inverse.NEWTON_STEPS)


def _fastflow_forward(x, logits, loc, log_scale):
    return fastflow.mixture_cdf(x, logits, loc, log_scale, kind=KIND, output=OUTPUT,
                                validate_args=False)


def _fastflow_inverse(y, logits, loc, log_scale):
    return fastflow.mixture_cdf_inverse(y, logits, loc, log_scale, kind=KIND, output=OUTPUT,
                                        validate_args=False)


FORWARDS = {
    "fastflow": _fastflow_forward,
    "torch-eager": _reference_forward,
    "torch-compile": torch.compile(_reference_forward),
}


def _timed(benchmark, fn, *args):
    def run():
        out = fn(*args)
        sync()
        return out

    run()  # warm-up: compilation and autotuning stay out of the timings
    return benchmark(run)


@pytest.mark.parametrize("variant", [*FORWARDS, "device-copy"])
def test_w1_forward(benchmark, w1_inputs, variant):
    benchmark.group = "W1 forward + logabsdet"
    x, *params = w1_inputs
    moved = _bytes(*w1_inputs) + 2 * _bytes(x)  # read x and parameters, write y and lad
    benchmark.extra_info["bytes"] = moved
    if variant == "device-copy":
        # read moved / 2 bytes and write as many: the same traffic as the op
        src = torch.zeros(moved // 8, dtype=torch.float32, device=x.device)
        dst = torch.empty_like(src)
        _timed(benchmark, dst.copy_, src)
        return
    with torch.no_grad():
        y, lad = _timed(benchmark, FORWARDS[variant], x, *params)
    assert torch.isfinite(lad).all()


@pytest.mark.parametrize("variant", list(FORWARDS))
def test_w2_forward_backward(benchmark, w1_inputs, variant):
    benchmark.group = "W2 forward + backward"
    leaves = [t.detach().clone().requires_grad_() for t in w1_inputs]

    def step():
        y, lad = FORWARDS[variant](*leaves)
        return torch.autograd.grad(y.sum() + lad.sum(), leaves)

    grads = _timed(benchmark, step)
    assert all(torch.isfinite(g).all() for g in grads)


INVERSES = {
    "fastflow": _fastflow_inverse,
    "torch-eager": _reference_inverse,
    "torch-compile": torch.compile(_reference_inverse),
}


@pytest.mark.parametrize("variant", list(INVERSES))
def test_w3_inverse(benchmark, w1_inputs, variant):
    benchmark.group = "W3 inverse"
    x, *params = w1_inputs
    with torch.no_grad():
        y, _ = _reference_forward(x, *params)
        x_inv, _ = _timed(benchmark, INVERSES[variant], y, *params)
    err = (x_inv - x).abs().max().item()
    benchmark.extra_info["round_trip_max_abs_err"] = err
    assert err < 1e-3
