"""torch.autocast: MADE's products take the region's dtype, the mixture ops, their inverse and
the one-pass solve keep float32 numerics (inputs cast up, float32 out), and flows train and
sample inside a region. On the CPU with bfloat16; the GPU runs the same tests with cuda."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow
from fastflow.distributions import StandardNormal
from fastflow.nn import AutoregressiveMixtureFlow, Flow

from conftest import DEVICE
from helpers import random_mixture, sample_x

LOW = torch.bfloat16
OPS = {
    "mixture_cdf": lambda x, *p: fastflow.mixture_cdf(x, *p, kind="gaussian", output="logit"),
    "mixture_log_prob": lambda x, *p: (fastflow.mixture_log_prob(x, *p, kind="logistic"),),
    "mixture_cdf_inverse": lambda y, *p: fastflow.mixture_cdf_inverse(y, *p, kind="logistic",
                                                                      output="logit"),
}


def _region():
    return torch.autocast(DEVICE.type, dtype=LOW)


@pytest.mark.parametrize("name", list(OPS))
def test_mixture_ops_take_float32_inputs_and_return_float32(backend, name):
    """Low-precision inputs in a region: outputs in float32, equal to the op on the inputs
    cast up outside any region, and the inputs' gradients those of that float32 op (in the
    inputs' dtype)."""
    torch.manual_seed(0)
    params = random_mixture((64,), 4, device=DEVICE)
    x = sample_x(*params, (64,), 4.0).float().to(DEVICE)
    low = [t.to(LOW).requires_grad_() for t in (x, *params)]
    up = [t.detach().float().requires_grad_() for t in low]
    with _region():
        outs = OPS[name](*low)
    expect = OPS[name](*up)
    for o, e in zip(outs, expect, strict=True):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    sum(o.sum() for o in outs).backward()
    sum(e.sum() for e in expect).backward()
    for a, b in zip(low, up, strict=True):
        assert a.grad.dtype == LOW
        torch.testing.assert_close(a.grad, b.grad.to(LOW), rtol=0, atol=0)


class _Dtypes(TorchDispatchMode):
    """Records the dtypes of the floating inputs of matrix products and of fastflow's ops."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("fastflow::") or func.overloadpacket in (
                torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.linear):
            flat = [a for a in args if isinstance(a, torch.Tensor)]
            for a in args:
                if isinstance(a, list | tuple):
                    flat += [t for t in a if isinstance(t, torch.Tensor)]
            self.seen.append((name, {t.dtype for t in flat if t.is_floating_point()}))
        return func(*args, **(kwargs or {}))


def _flow(D=5):
    torch.manual_seed(0)
    return Flow([AutoregressiveMixtureFlow(D, 3, [32, 32], output="logit")],
                StandardNormal(D)).to(DEVICE)


def test_flow_log_prob_in_a_region_runs_made_low_and_the_mixture_in_float32(monkeypatch):
    """A MAF's density in a region: MADE's products in bfloat16, the mixture op on float32
    inputs, a float32 result within bfloat16's rounding of the float32 one, and float32
    gradients for every parameter."""
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    flow = _flow()
    x = torch.randn(32, 5, device=DEVICE)
    full = flow.log_prob(x)
    mode = _Dtypes()
    with _region(), mode:
        lp = flow.log_prob(x)
    products = [d for n, d in mode.seen if not n.startswith("fastflow::")]
    mixture = [d for n, d in mode.seen if n.startswith("fastflow::mixture")]
    assert products and all(d == {LOW} for d in products), mode.seen
    assert mixture and all(d == {torch.float32} for d in mixture), mode.seen
    assert lp.dtype == torch.float32
    assert not torch.equal(lp, full)  # the products did run in bfloat16
    torch.testing.assert_close(lp, full, rtol=0.05, atol=0.05)
    lp.mean().backward()
    for p in flow.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()


def test_flow_samples_in_a_region_as_outside_it(backend):
    """Sampling in a region (the one-pass solve) gives what it gives outside one: the solve
    runs in float32 with the region off inside it (else its products would meet the
    region's casts: bfloat16 products, or a dtype error)."""
    flow = _flow()
    with torch.no_grad():
        torch.manual_seed(1)
        outside = flow.sample(7)
        torch.manual_seed(1)
        with _region():
            inside = flow.sample(7)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_float64_stays_float64_in_a_region():
    """Autocast leaves float64 alone, and so do the ops."""
    params = random_mixture((16,), 3, dtype=torch.float64, device=DEVICE)
    x = sample_x(*params, (16,), 4.0).to(DEVICE)
    with _region():
        y, lad = fastflow.mixture_cdf(x, *params, kind="logistic", output="unit")
    assert y.dtype == lad.dtype == torch.float64
    expect = fastflow.mixture_cdf(x, *params, kind="logistic", output="unit")
    torch.testing.assert_close((y, lad), expect, rtol=0, atol=0)
