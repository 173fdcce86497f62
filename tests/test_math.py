"""The kernels' device math helpers against scipy in float64 (run interpreted on the CPU)."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from fastflow.kernels._math import gauss_log_hazard, log1p, log_ndtr, softplus
from scipy import special

from conftest import DEVICE


@triton.jit
def _apply_kernel(x_ptr, out_ptr, N, FN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if FN == 0:
        y = log_ndtr(x)
    elif FN == 1:
        y = gauss_log_hazard(x)
    elif FN == 2:
        y = log1p(x)
    else:
        y = softplus(x)
    tl.store(out_ptr + offs, y, mask=mask)


FNS = {"log_ndtr": 0, "gauss_log_hazard": 1, "log1p": 2, "softplus": 3}


def apply(name, x):
    out = torch.empty_like(x)
    _apply_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), FN=FNS[name], BLOCK=1024)
    return out.double().cpu().numpy()


def _hazard64(v):
    return -0.5 * v * v - 0.5 * np.log(2 * np.pi) - special.log_ndtr(-v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_log_ndtr_relative_accuracy(dtype):
    x = torch.linspace(-30, 30, 6001, dtype=dtype, device=DEVICE)
    want = special.log_ndtr(x.double().cpu().numpy())
    got = apply("log_ndtr", x)
    # float32 cannot hold log Phi(v) ~ -Phi(-v) below ~1e-30 (v > 11.3): absolute there.
    representable = np.abs(want) > (1e-30 if dtype == torch.float32 else 1e-300)
    rel = np.abs(got - want) / np.abs(want)
    assert rel[representable].max() <= (1e-5 if dtype == torch.float32 else 1e-12)
    assert np.abs(got - want)[~representable].max(initial=0.0) <= 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gauss_log_hazard_has_no_tail_cancellation(dtype):
    x = torch.linspace(-30, 30, 6001, dtype=dtype, device=DEVICE)
    want = _hazard64(x.double().cpu().numpy())
    got = apply("gauss_log_hazard", x)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    assert (np.abs(got - want) / np.maximum(1.0, np.abs(want))).max() <= tol
    # The far tail (u = 1e4) where phi and Phi(-u) both underflow: hazard ~ u.
    far = apply("gauss_log_hazard", torch.tensor([1e4, 1e6], dtype=dtype, device=DEVICE))
    np.testing.assert_allclose(far, np.log([1e4, 1e6]), rtol=1e-6)


def test_log1p_and_softplus_are_exact_where_naive_forms_fail():
    x = torch.tensor([1e-30, -1e-12, 3e-8, 0.5, -0.75, 1e30], dtype=torch.float32, device=DEVICE)
    np.testing.assert_allclose(apply("log1p", x), np.log1p(x.double().cpu().numpy()), rtol=2e-7)
    s = torch.tensor([-80.0, -20.0, 0.0, 20.0, 1e4], dtype=torch.float32, device=DEVICE)
    want = np.logaddexp(0.0, s.double().cpu().numpy())
    # A GPU's fp32 exp (ex2.approx on x log2 e) is off by about |x| ulp: 3.5e-7 at x = -80.
    rtol = 5e-7 if torch.cuda.is_available() else 2e-7
    np.testing.assert_allclose(apply("softplus", s), want, rtol=rtol)


def _mills_ratio(u):
    """phi(u) / Phi(u), the derivative of log Phi, in float64: scipy's log forms for
    u > -100, the asymptotic series -u / (1 - 1/u^2 + 3/u^4 - 15/u^6 + 105/u^8) below (its
    next term, 945/u^10, is below float64's resolution there)."""
    u = np.asarray(u, dtype=np.float64)
    near = np.exp(-0.5 * u * u - 0.5 * np.log(2 * np.pi) - special.log_ndtr(np.maximum(u, -100)))
    w = 1.0 / (u * u)
    far = -u / (1 - w + 3 * w * w - 15 * w ** 3 + 105 * w ** 4)
    return np.where(u > -100, near, far)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_oracle_log_ndtr_derivatives_stay_exact_down_the_lower_tail(dtype):
    """The oracle's log Phi (reference.naive.log_ndtr, through which the ops' higher
    derivatives are taken) has the value of scipy's log_ndtr and an exact first derivative
    phi/Phi down the lower tail, where torch's log_ndtr derivative is not (955 for 1000 at
    u = -1000 in float32, inf past -3e9 in float64); its second derivative is finite."""
    from fastflow.reference.naive import log_ndtr as oracle_log_ndtr

    lowest = -1e7 if dtype == torch.float32 else -1e12
    u = torch.cat([torch.linspace(-30, 30, 601, dtype=torch.float64),
                   -torch.logspace(1.5, np.log10(-lowest), 60, dtype=torch.float64)])
    u = u.to(dtype).requires_grad_()
    value = oracle_log_ndtr(u)
    grad, = torch.autograd.grad(value.sum(), u, create_graph=True)
    second, = torch.autograd.grad(grad.sum(), u)
    u64 = u.detach().double().numpy()
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(value.detach().double().numpy(), special.log_ndtr(u64),
                               rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(grad.detach().double().numpy(), _mills_ratio(u64),
                               rtol=rtol, atol=1e-30)
    assert torch.isfinite(second).all()
