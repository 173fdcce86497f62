"""mixture_cdf and mixture_log_prob: kernels against the reference, the reference against
independent float64 math (scipy, autograd Jacobians, finite differences, quadrature)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastflow
from fastflow.reference import naive

from conftest import DEVICE, HAS_CUDA
from helpers import (
    assert_close_grads,
    oracle,
    random_mixture,
    rel_err,
    sample_x,
    ulp_sensitivity,
)

KINDS = ["logistic", "gaussian"]
OUTPUTS = ["unit", "logit"]
# x reaches 1e4 component scales for logistic components, 30 for Gaussian ones (the contract).
U_MAX = {"logistic": 1e4, "gaussian": 30.0}

# (x shape, K, shared parameters): odd sizes, K = 1 and non-powers of two, broadcasting.
CASES = [
    pytest.param((5, 123), 3, False, id="5x123-K3"),
    pytest.param((5, 123), 1, True, id="5x123-K1-shared"),
    pytest.param((2, 3, 17), 10, True, id="2x3x17-K10-shared"),
    pytest.param((37,), 10, False, id="37-K10"),
    # contiguous per-element parameters, K a power of two: the kernels' DENSE loads
    pytest.param((7, 33), 4, False, id="7x33-K4-dense"),
]


def _fwd(x, params, kind, output):
    if output == "density":
        return None, fastflow.mixture_log_prob(x, *params, kind=kind)
    return fastflow.mixture_cdf(x, *params, kind=kind, output=output)


def _run_with_grads(backend, monkeypatch, x, params, kind, output):
    """Outputs and gradients of a random scalar loss, on one backend."""
    monkeypatch.setenv("FASTFLOW_BACKEND", backend)
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y, lad = _fwd(leaves[0], leaves[1:], kind, output)
    gen = torch.Generator(device="cpu").manual_seed(7)
    w_lad = torch.randn(lad.shape, generator=gen, dtype=torch.float64).to(lad)
    loss = (lad * w_lad).sum()
    if y is not None:
        loss = loss + (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return y, lad, grads


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,K,shared", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_kernel_matches_reference(monkeypatch, dtype, shape, K, shared, kind, output):
    params = random_mixture(shape, K, dtype=dtype, device=DEVICE, shared=shared)
    x = sample_x(*params, shape, 6.0)
    got = _run_with_grads("triton", monkeypatch, x, params, kind, output)
    want = _run_with_grads("reference", monkeypatch, x, params, kind, output)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    if output != "density":
        torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert_close_grads(got[2], want[2], **tol)


# (x shape, K) that need several programs of the backward even under the interpreter, whose
# tiles hold 16384 lanes: 3 tiles of 4096 elements (K = 3), 8 of 256 (K = 64, DENSE loads).
MULTI_PROGRAM_CASES = [
    pytest.param((3, 3000), 3, id="3x3000-K3"),
    pytest.param((16, 128), 64, id="16x128-K64-dense"),
]


@pytest.mark.parametrize("shape,K", MULTI_PROGRAM_CASES)
def test_backward_kernel_over_several_programs_matches_reference(monkeypatch, shape, K):
    """The backward kernel where the launch has more than one program: each program must read
    and write its own tile of elements (most other cases fit in one tile when interpreted)."""
    from fastflow.kernels.launch import cdiv, param_views, tile
    from fastflow.kernels.mixture_cdf import LAUNCH

    params = random_mixture(shape, K, dtype=torch.float64, device=DEVICE)
    x = sample_x(*params, shape, 6.0)
    block_n = tile(param_views(x, *params)[3], LAUNCH, warps="bwd_warps")[0]
    assert cdiv(x.numel(), block_n) > 1
    got = _run_with_grads("triton", monkeypatch, x, params, "logistic", "logit")
    want = _run_with_grads("reference", monkeypatch, x, params, "logistic", "logit")
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert_close_grads(got[2], want[2], **tol)


@pytest.mark.parametrize("K", [1, 3, 64])
@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_accuracy_against_float64_oracle(backend, kind, output, K):
    """The accuracy contract over the full parameter ranges: logits spread +-50,
    log_scale in [-10, 10], x out to 1e4 (logistic) / 30 (Gaussian) component scales."""
    shape = (16, 128)
    params = random_mixture(shape, K, device=DEVICE, logit_spread=50.0,
                            log_scale_range=(-10.0, 10.0), loc_spread=3.0)
    x = sample_x(*params, shape, U_MAX[kind])
    y, lad = (None, fastflow.mixture_log_prob(x, *params, kind=kind)) if output == "density" \
        else fastflow.mixture_cdf(x, *params, kind=kind, output=output)
    o = oracle(x, *params, kind)
    assert torch.isfinite(lad).all()
    if output == "unit":
        assert np.abs(y.double().cpu().numpy() - o["unit"]).max() <= 1e-6
        assert rel_err(lad, o["log_f"]).max() <= 1e-5
    elif output == "logit":
        assert rel_err(y, o["logit"]).max() <= 1e-5
        err = np.abs(lad.double().cpu().numpy() - o["logit_lad"])
        tol = 1e-5 * np.maximum(1.0, np.abs(o["logit_lad"]))
        # Where Gaussian hazards differ widely, the exact log-derivative moves by more than
        # 1e-5 when an input moves by one float32 ulp (the 1e-5 tolerance is then below the
        # problem's own conditioning): there, allow the error of a backward-stable evaluation.
        over = err > tol
        if over.any():
            sens = ulp_sensitivity(x, *params, kind, "logit_lad")
            assert (err[over] <= 2 * sens[over]).all()
    else:
        assert rel_err(lad, o["log_f"]).max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", KINDS)
def test_unit_output_relatively_exact_in_the_lower_tail(backend, kind, dtype):
    """y = F(x) down to 1e-19 keeps its relative accuracy (F is taken directly below one
    half, never as 1 - (1 - F), which is 0 there): 1e-5 in float32, 1e-12 in float64."""
    logits = torch.tensor([0.3, -0.2, 0.1], dtype=dtype, device=DEVICE)
    loc = torch.tensor([-1.0, 0.0, 2.0], dtype=dtype, device=DEVICE)
    log_scale = torch.tensor([0.0, -0.5, 0.3], dtype=dtype, device=DEVICE)
    x = torch.linspace(-60.0 if kind == "logistic" else -10.0, -1.5, 256, dtype=dtype,
                       device=DEVICE)
    y, _ = fastflow.mixture_cdf(x, logits, loc, log_scale, kind=kind, output="unit")
    want = oracle(x, logits.expand(256, 3), loc.expand(256, 3), log_scale.expand(256, 3),
                  kind)["unit"]
    assert want.min() < 1e-18 and want.max() < 0.5
    err = np.abs(y.double().cpu().numpy() / want - 1.0)
    assert err.max() <= (1e-5 if dtype == torch.float32 else 1e-12), f"worst {err.max():.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_unit_output_gradients_relatively_exact_in_the_lower_tail(backend, kind):
    """float32 gradients of y = F(x) for F down to 1e-19, against float64 autograd through
    the log-space forward: dF = F dlog F there (through 1 - F, dF = -(1 - F) dlog(1 - F)
    would lose everything). Relative to each row's largest, 1e-5."""

    n = 64
    params = [torch.tensor(v, device=DEVICE).expand(n, 3).clone()
              for v in ([0.3, -0.2, 0.1], [-1.0, 0.0, 2.0], [0.0, -0.5, 0.3])]
    x = torch.linspace(-40.0 if kind == "logistic" else -8.0, -1.5, n, device=DEVICE)
    leaves = [t.requires_grad_() for t in (x, *params)]
    y, _ = fastflow.mixture_cdf(*leaves, kind=kind, output="unit")
    got = torch.autograd.grad(y.sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *params)]
    y64, _ = naive.forward(*leaves64, kind, "unit")
    want = torch.autograd.grad(y64.sum(), leaves64)
    for name, g, w in zip(("x", "logits", "loc", "log_scale"), got, want, strict=True):
        scale = w.abs() if w.dim() == 1 else w.abs().amax(-1, keepdim=True)
        err = float(((g.double() - w).abs() / scale).max())
        assert err <= 1e-5, f"{name}: worst {err:.3g}"


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_logit_lad_tail_regression(backend, kind, output):
    """Far tails, where log f - log F - log(1-F) cancels in float32 (|u| up to 1e4)."""
    u = torch.tensor([-1e4, -3e3, -50.0, 50.0, 3e3, 1e4]) if kind == "logistic" \
        else torch.tensor([-30.0, -25.0, -8.0, 8.0, 25.0, 30.0])
    logits = torch.tensor([[0.3, -1.0]]).expand(6, 2)
    loc = torch.tensor([[0.5, -0.25]]).expand(6, 2)
    log_scale = torch.tensor([[0.0, 0.7]]).expand(6, 2)
    x = u * 2.0
    params = [t.to(DEVICE) for t in (logits, loc, log_scale)]
    y, lad = fastflow.mixture_cdf(x.to(DEVICE), *params, kind=kind, output=output)
    o = oracle(x, *params, kind)
    want = o["logit_lad"] if output == "logit" else o["log_f"]
    assert rel_err(lad, want).max() <= 1e-5


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fp64(backend, kind, output):
    params = random_mixture((3, 4), 3, dtype=torch.float64, device=DEVICE, shared=True)
    x = sample_x(*params, (3, 4), 4.0)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]

    def fn(*a):
        y, lad = _fwd(a[0], a[1:], kind, output)
        return lad if y is None else (y, lad)

    # Interpreted kernels are slow: a random-projection gradcheck there, the full one on the
    # reference (and on a GPU).
    fast = backend == "triton" and not HAS_CUDA
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_oracle_fp64(kind, output):
    params = random_mixture((4, 50), 5, dtype=torch.float64, logit_spread=5.0,
                            log_scale_range=(-3.0, 3.0))
    x = sample_x(*params, (4, 50), 40.0 if kind == "logistic" else 12.0)
    y, lad = fastflow.mixture_cdf(x, *params, kind=kind, output=output)
    o = oracle(x, *params, kind)
    np.testing.assert_allclose(y.numpy(), o[output], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(lad.numpy(), o["logit_lad" if output == "logit" else "log_f"],
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_logabsdet_is_log_of_autograd_derivative(backend, kind, output):
    params = random_mixture((6, 7), 4, dtype=torch.float64, device=DEVICE)
    x = sample_x(*params, (6, 7), 5.0).requires_grad_()
    y, lad = fastflow.mixture_cdf(x, *params, kind=kind, output=output)
    (dy_dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(lad, dy_dx.log(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_density_matches_finite_differences_and_integrates_to_one(backend, kind):
    """log_prob = lad of the unit output = log dF/dx (central differences), and the density
    integrates to 1 (trapezoid rule on a fine grid) — independent of any derivative code."""
    logits = torch.tensor([0.2, -0.4, 1.0], dtype=torch.float64, device=DEVICE)
    loc = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64, device=DEVICE)
    log_scale = torch.tensor([-0.5, 0.3, 0.0], dtype=torch.float64, device=DEVICE)
    grid = torch.linspace(-60.0, 60.0, 48001, dtype=torch.float64, device=DEVICE)
    log_p = fastflow.mixture_log_prob(grid, logits, loc, log_scale, kind=kind)
    assert abs(torch.trapezoid(log_p.exp(), grid).item() - 1.0) < 1e-6
    z, lad = fastflow.mixture_cdf(grid, logits, loc, log_scale, kind=kind)
    torch.testing.assert_close(lad, log_p, rtol=1e-12, atol=1e-12)
    h = 1e-5
    zp, _ = fastflow.mixture_cdf(grid[::40] + h, logits, loc, log_scale, kind=kind)
    zm, _ = fastflow.mixture_cdf(grid[::40] - h, logits, loc, log_scale, kind=kind)
    fd = (zp - zm) / (2 * h)
    torch.testing.assert_close(fd, log_p[::40].exp(), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("output", OUTPUTS)
def test_broadcast_parameter_grads_are_reduced(backend, output):
    """Shared (D, K) parameters get the sum of the per-element gradients."""
    shape, K = (6, 5), 3
    shared = [t.requires_grad_() for t in random_mixture(shape, K, device=DEVICE, shared=True)]
    per_elem = [t.detach().expand(*shape, K).clone().requires_grad_() for t in shared]
    x = sample_x(*shared, shape, 4.0).detach()
    for p in (shared, per_elem):
        y, lad = fastflow.mixture_cdf(x, *p, kind="logistic", output=output)
        (y.sum() + 0.5 * lad.sum()).backward()
    for s, e in zip(shared, per_elem, strict=True):
        assert s.grad.shape == s.shape
        torch.testing.assert_close(s.grad, e.grad.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["mixture_cdf_bwd", "mixture_cdf_inverse_bwd"])
def test_broadcast_cotangents_give_the_materialised_gradients(op, monkeypatch):
    """The gradient of a sum reaches the backward ops as one value expanded over x's shape,
    which the kernels read in place (stride 0) rather than copied; a partly expanded one is
    copied. Either way the gradients are those of the same values stored in full."""
    from fastflow.kernels.launch import cotangent

    shape, K = (6, 40), 4
    params = [p.expand(*shape, K) for p in random_mixture(shape, K, device=DEVICE)]
    x = sample_x(*params, shape, 4.0)
    one = torch.tensor(0.75, device=DEVICE).expand(shape)
    rows = torch.randn(6, 1, device=DEVICE).expand(shape)
    assert cotangent(one)[1] == 0 and cotangent(rows)[1] == 1
    fn = getattr(torch.ops.fastflow, op)
    for a, b in ((one, rows), (rows, one), (one, one)):
        monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
        got = fn(a, b, x, *params, "logistic", "logit")
        want = fn(a.contiguous(), b.contiguous(), x, *params, "logistic", "logit")
        monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
        ref = fn(a, b, x, *params, "logistic", "logit")
        for g, w, r in zip(got, want, ref, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite_over_full_ranges(backend, kind, output):
    shape = (4, 64)
    params = [t.requires_grad_() for t in random_mixture(
        shape, 8, device=DEVICE, logit_spread=50.0, log_scale_range=(-10.0, 10.0))]
    x = sample_x(*params, shape, U_MAX[kind]).detach().requires_grad_()
    y, lad = _fwd(x, params, kind, output)
    loss = lad.sum() if y is None else lad.sum() + y.sum()
    grads = torch.autograd.grad(loss, [x, *params])
    for g in grads:
        assert torch.isfinite(g).all()


HALF = [pytest.param(torch.float16, id="fp16"),
        pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("output", OUTPUTS)
def test_half_inputs_compute_in_fp32_and_return_input_dtype(backend, dtype, output):
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 is emulated wrongly by the Triton interpreter; checked on a GPU")
    params = random_mixture((4, 9), 3, device=DEVICE)
    x = sample_x(*params, (4, 9), 4.0)
    half = [t.to(dtype) for t in (x, *params)]
    y, lad = fastflow.mixture_cdf(*half, kind="gaussian", output=output)
    assert y.dtype == dtype and lad.dtype == dtype
    y32, lad32 = fastflow.mixture_cdf(*[t.float() for t in half], kind="gaussian", output=output)
    torch.testing.assert_close(y, y32.to(dtype))
    torch.testing.assert_close(lad, lad32.to(dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_half_gradients_and_inverse_compute_in_fp32(backend, kind, dtype, output):
    """Half-precision leaves: the forward's gradients and the inverse (values and gradients)
    come back in each tensor's own dtype, equal to the float32 computation on the same
    (half-rounded) values, rounded once. The inverse's gradients are taken at the solution
    it returned, rounded to half: the float32 VJP at that x."""
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 is emulated wrongly by the Triton interpreter; checked on a GPU")
    params = random_mixture((4, 9), 3, device=DEVICE)
    x = sample_x(*params, (4, 9), 4.0)
    half = [t.to(dtype).requires_grad_() for t in (x, *params)]
    full = [t.detach().float().requires_grad_() for t in half]
    for op, first in ((fastflow.mixture_cdf, 0), (fastflow.mixture_cdf_inverse, None)):
        if first is None:  # the inverse of the forward's (half) output
            y, _ = fastflow.mixture_cdf(*(t.detach() for t in half), kind=kind, output=output)
            half[0] = y.requires_grad_()
            full[0] = y.detach().float().requires_grad_()
        out = op(*half, kind=kind, output=output)
        want = op(*full, kind=kind, output=output)
        for o, w in zip(out, want, strict=True):
            assert o.dtype == dtype
            torch.testing.assert_close(o, w.to(dtype))
        grads = torch.autograd.grad(sum(o.float().sum() for o in out), half)
        if first is None:
            ones = torch.ones_like(out[0], dtype=torch.float32)
            grads32 = torch.ops.fastflow.mixture_cdf_inverse_bwd(
                ones, ones, out[0].detach().float(), *(t.detach() for t in full[1:]), kind,
                output)
        else:
            grads32 = torch.autograd.grad(sum(w.to(dtype).float().sum() for w in want), full)
        for g, g32, t in zip(grads, grads32, half, strict=True):
            assert g.dtype == t.dtype
            torch.testing.assert_close(g, g32.to(dtype))


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS), output=st.sampled_from(OUTPUTS),
    K=st.integers(1, 6), x=st.floats(-30, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_logabsdet_equals_autograd(kind, output, K, x, seed):
    gen = torch.Generator().manual_seed(seed)
    logits, loc = torch.randn(2, K, generator=gen, dtype=torch.float64) * 3
    log_scale = torch.rand(K, generator=gen, dtype=torch.float64) * 4 - 2
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y, lad = fastflow.mixture_cdf(xt, logits, loc, log_scale, kind=kind, output=output)
    (dy,) = torch.autograd.grad(y, xt)
    if dy > 1e-250:  # deep in a tail the derivative itself underflows; lad stays finite
        assert abs(lad.item() - dy.log().item()) <= 1e-8 * max(1.0, abs(lad.item()))
    assert torch.isfinite(lad)


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_written_out_vjp_equals_autograd(kind, output):
    """The reference's written-out gradients against torch autograd through its forward."""
    from fastflow.reference.mixture_cdf import mixture_cdf_bwd
    from fastflow.reference.naive import forward as _forward

    params = random_mixture((5, 9), 4, dtype=torch.float64, logit_spread=4.0,
                            log_scale_range=(-2.0, 2.0))
    x = sample_x(*params, (5, 9), 10.0)
    gy, gl = torch.randn(2, 5, 9, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    y, lad = _forward(*leaves, kind, output)
    outs, cots = ([lad], [gl]) if y is None else ([y, lad], [gy, gl])
    want = torch.autograd.grad(outs, leaves, cots)
    got = mixture_cdf_bwd(None if y is None else gy, gl, x, *params, kind, output)
    assert_close_grads(got, want, rtol=1e-8, atol=1e-10)


def test_dense_loads_only_for_contiguous_power_of_two_components():
    """The kernels' DENSE path indexes parameters as n * K + k: it must be chosen exactly when
    that is where the components are."""
    from fastflow.kernels.launch import dense, param_views

    def views(x, *params):
        return param_views(x, *params)[3]

    x = torch.zeros(3, 5)
    p4 = [torch.zeros(3, 5, 4) for _ in range(3)]
    assert dense(views(x, *p4), 4)
    assert not dense(views(x, *[torch.zeros(3, 5, 3) for _ in range(3)]), 4)  # K < BLOCK_K
    assert not dense(views(x, *[torch.zeros(5, 4).expand(3, 5, 4)] * 3), 4)  # broadcast
    strided = torch.zeros(3, 5, 8)[..., ::2]
    assert not dense(views(x, p4[0], strided, p4[2]), 4)
    transposed = torch.zeros(5, 3, 4).transpose(0, 1)
    assert not dense(views(x, transposed, p4[1], p4[2]), 4)
    # DENSE 1 shares a row among threads; DENSE 2 (the inverse) and 0 keep rows whole, so
    # their tiles hold at least one row per thread
    from fastflow.kernels.launch import tile

    launch = {"lanes": 512, "num_warps": 4}
    assert tile(views(x, *p4), launch)[2] == 1
    block_n, _, mode = tile(views(x, *p4), launch, whole_rows=True)
    assert mode == 2 and block_n >= 32 * launch["num_warps"]
    assert tile(views(x, transposed, p4[1], p4[2]), launch, whole_rows=True)[2] == 0


def test_launch_arithmetic_agrees_with_triton():
    """The launchers' plain-Python next_pow2 and cdiv (Triton's own cost host time per call)
    give Triton's results wherever the launchers use them (n >= 1; cdiv of n >= 0)."""
    import triton
    from fastflow.kernels.launch import cdiv, next_pow2

    for n in range(1, 3000):
        assert next_pow2(n) == triton.next_power_of_2(n)
        for b in (1, 3, 16, 1024):
            assert cdiv(n - 1, b) == triton.cdiv(n - 1, b)
    assert next_pow2(2**40 + 1) == triton.next_power_of_2(2**40 + 1)


# The CPU path: sums in probability space, the log-space formulas where they underflow.

def _log_space_vjp(grad_y, grad_lad, args, kind, output):
    from fastflow.reference import mixture_cdf as ref

    p = ref.vjp_pieces(*args, kind, output)
    return ref.vjp_assemble(*ref.output_coefs(grad_y, grad_lad, p, output), p)


def _vjp_scales(grad_y, grad_lad, args, kind, output):
    """Each gradient's scale as a sum of absolute values of its terms (float64), taken for
    the per-component gradients as the largest over the element's components: an fp32
    evaluation's error is relative to that, not to a sum that cancels or to a negligible
    component's own value."""
    from fastflow.reference import mixture_cdf as ref

    p = ref.vjp_pieces(*args, kind, output)
    c_cdf, c_sf, c_pdf = (c.unsqueeze(-1) for c in ref.output_coefs(grad_y, grad_lad, p, output))
    du = (c_cdf * p["du_cdf"]).abs() + (c_sf * p["du_sf"]).abs() + (c_pdf * p["du_pdf"]).abs()
    resp_f = (c_pdf * p["resp_f"]).abs()
    logits = ((c_cdf * p["resp_cdf"]).abs() + (c_sf * p["resp_sf"]).abs() + resp_f
              + p["pi"] * (c_cdf.abs() + c_sf.abs() + c_pdf.abs()))
    per_k = [logits, du * p["inv_s"], (p["u"] * du).abs() + resp_f]
    return [(du * p["inv_s"]).sum(-1), *(s.amax(-1, keepdim=True) for s in per_k)]


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_path_gradients_as_accurate_as_the_log_space_formulas(kind, output):
    """Over the full parameter ranges in float32 (a quarter of the logistic elements take the
    log-space fallback), the CPU path's gradients are as close to the float64 ones as the
    log-space formulas evaluated in float32 are, each error taken relative to
    ``_vjp_scales``. Components below about 1e-30 of their element's largest lose relative
    accuracy to underflow in probability space; they are within that scale's error."""
    from fastflow.reference import mixture_cdf as ref

    shape = (16, 128)
    params = random_mixture(shape, 8, logit_spread=50.0, log_scale_range=(-10.0, 10.0),
                            loc_spread=3.0)
    x = sample_x(*params, shape, U_MAX[kind])
    gy, gl = torch.randn(2, *shape)
    args32 = [x, *params]
    args64 = [t.double() for t in args32]
    got = ref.mixture_cdf_bwd(None if output == "density" else gy, gl, *args32, kind, output)
    log32 = _log_space_vjp(gy, gl, args32, kind, output)
    want = _log_space_vjp(gy.double(), gl.double(), args64, kind, output)
    scales = _vjp_scales(gy.double(), gl.double(), args64, kind, output)
    for name, g, g_log, w, s in zip(("x", "logits", "loc", "log_scale"), got, log32, want,
                                    scales, strict=True):
        err = ((g.double() - w).abs() / s).max().item()
        err_log = ((g_log.double() - w).abs() / s).max().item()
        assert err <= 2 * err_log + 1e-6, f"{name}: {err:.3g} against {err_log:.3g}"


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_path_sends_exactly_the_underflowing_elements_to_log_space(monkeypatch, kind,
                                                                      output):
    """Elements 60 scales out (a sum of about 1e-26: representable in float32, below the
    sqrt(tiny) floor) and non-finite ones take the log-space formulas, and only they do;
    the results there equal the log-space forward's and VJP's."""
    from fastflow.reference import mixture_cdf as ref

    K = 3
    params = [t.expand(9, K) for t in (torch.zeros(K), torch.tensor([-1.0, 0.0, 1.0]),
                                        torch.zeros(K))]
    tails = [-60.0, 60.0, math.inf, -math.inf, math.nan]
    if kind == "gaussian":  # 60 is far past Gaussian underflow: 10.5 gives a sum of 3e-22
        tails[:2] = [-10.5, 10.5]
    x = torch.tensor([-2.0, 0.0, 0.5, 2.5, *tails])
    seen = []
    forward, pieces = naive.forward, ref.vjp_pieces
    monkeypatch.setattr(naive, "forward", lambda *a: seen.append(a[0].numel()) or forward(*a))
    monkeypatch.setattr(ref, "vjp_pieces",
                        lambda *a: seen.append(a[0].numel()) or pieces(*a))
    y, lad = ref.mixture_cdf_fwd(x, *params, kind, output)
    gy, gl = torch.randn(2, 9)
    grads = ref.mixture_cdf_bwd(gy, gl, x, *params, kind, output)
    assert seen == [5, 5]
    seen.clear()
    ref.mixture_cdf_fwd(x[:4], *(p[:4] for p in params), kind, output)
    ref.mixture_cdf_bwd(gy[:4], gl[:4], x[:4], *(p[:4] for p in params), kind, output)
    assert seen == []
    y_log, lad_log = forward(x, *params, kind, output)
    torch.testing.assert_close(lad, lad_log, equal_nan=True)
    if y is not None:
        torch.testing.assert_close(y, y_log, equal_nan=True)
    want = _log_space_vjp(gy, gl, [x, *params], kind, output)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g[4:6], w[4:6])
        torch.testing.assert_close(g[:4], w[:4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,output,log_scale,u", [
    # f's terms pi c flush before 1/s = e^60 scales them back up: f is far above sqrt(tiny)
    # yet has lost its largest term (a review's case: logistic, 89.5 scales out).
    pytest.param("logistic", "density", -60.0, 89.5, id="flushed-f-term"),
    pytest.param("logistic", "unit", -60.0, 89.5, id="flushed-f-term-unit"),
    # f / (F (1 - F)) overflows float32 while f, F and 1 - F are finite.
    pytest.param("gaussian", "logit", -87.5, -8.9, id="overflowing-logit-ratio"),
])
def test_cpu_path_tiny_scales_take_log_space(kind, output, log_scale, u):
    """Scales near float32's limit: the CPU path's results and gradients are the log-space
    formulas', and match float64."""
    from fastflow.reference import mixture_cdf as ref

    s = math.exp(log_scale)
    x = torch.tensor([u * s])
    logits, loc = torch.zeros(1, 2), torch.tensor([[0.0, u * s + 42.5]])
    ls = torch.tensor([[log_scale, 0.0]])
    if kind == "gaussian":
        loc[0, 1] = 1e4  # a second component too far out to matter
    args = [x, logits, loc, ls]
    y, lad = ref.mixture_cdf_fwd(*args, kind, output)
    y64, lad64 = naive.forward(*(a.double() for a in args), kind, output)
    assert torch.isfinite(lad).all()
    torch.testing.assert_close(lad.double(), lad64, rtol=2e-6, atol=0)
    if y is not None:
        torch.testing.assert_close(y.double(), y64, rtol=2e-6, atol=1e-30)
    gy, gl = torch.tensor([0.3]), torch.tensor([0.7])
    got = ref.mixture_cdf_bwd(gy, gl, *args, kind, output)
    want = _log_space_vjp(gy, gl, args, kind, output)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("output", ["density", "unit", "logit"])
def test_flushed_density_terms_with_tiny_scales_match_float64(backend, output):
    """Both backends: a logistic term pi c that flushes to zero before 1/s = e^60 scales it
    back up leaves f far above any fixed floor yet missing its largest term (GPUs flush at
    the smallest normal number, the emulated approximations too). The forward and the
    inverse must send such rows to log space."""

    s, u = math.exp(-60.0), 89.5
    x = torch.tensor([u * s])
    logits, loc = torch.zeros(1, 2), torch.tensor([[0.0, u * s + 42.5]])
    ls = torch.tensor([[-60.0, 0.0]])
    args64 = [a.double() for a in (x, logits, loc, ls)]
    y64, lad64 = naive.forward(*args64, "logistic", output)
    if output == "density":
        lad = fastflow.mixture_log_prob(x, logits, loc, ls, kind="logistic")
    else:
        y, lad = fastflow.mixture_cdf(x, logits, loc, ls, kind="logistic", output=output)
        torch.testing.assert_close(y.double(), y64, rtol=2e-6, atol=0)
        # The inverse's logabsdet at its solution is minus the float64 forward's there.
        x_inv, lad_inv = fastflow.mixture_cdf_inverse(y, logits, loc, ls, kind="logistic",
                                                      output=output)
        _, lad_at = naive.forward(x_inv.double(), *args64[1:], "logistic", output)
        torch.testing.assert_close(-lad_inv.double(), lad_at, rtol=2e-6, atol=0)
    torch.testing.assert_close(lad.double(), lad64, rtol=2e-6, atol=0)


def test_log_space_logistic_terms_exact_past_softplus_threshold():
    """float64 log C(u), log(1 - C(u)) beyond |u| = 20, where softplus's default threshold
    drops e^-|u|: the density of one logistic component, -|u| - 2 log(1 + e^-|u|) - log s."""

    u = torch.tensor([-35.0, -25.0, -21.0, 21.0, 30.0], dtype=torch.float64)
    zero = torch.zeros(5, 1, dtype=torch.float64)
    _, lad = naive.forward(u, zero, zero, zero, "logistic", "density")
    want = torch.tensor([-abs(v) - 2 * math.log1p(math.exp(-abs(v))) for v in u.tolist()],
                        dtype=torch.float64)
    torch.testing.assert_close(lad, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("output", ["unit", "logit", "density"])
@pytest.mark.parametrize("kind", KINDS)
def test_infinite_x_has_no_gradient_and_leaves_shared_parameters_finite(backend, kind, output):
    """At x = +-inf the map is flat at its limits: its gradients are 0, and the parameters
    shared with finite elements get exactly the finite elements' gradients (before, the
    infinite element's inf * 0 made x's gradient and every shared parameter's NaN, even for
    a loss that does not use that element)."""
    torch.manual_seed(0)
    K = 3
    shared = [torch.randn(2, K), torch.randn(2, K), 0.5 * torch.randn(2, K)]
    x = torch.tensor([[math.inf, 0.3], [-0.7, -math.inf], [1.1, 0.2]])

    def grads(x):
        x = x.clone().to(DEVICE).requires_grad_()
        params = [p.clone().to(DEVICE).requires_grad_() for p in shared]
        previous = fastflow.get_validate_args()
        fastflow.set_validate_args(False)  # "logit" refuses infinite x under validation
        try:
            if output == "density":
                loss = fastflow.mixture_log_prob(x, *params, kind=kind)[2].sum()
            else:
                y, lad = fastflow.mixture_cdf(x, *params, kind=kind, output=output)
                loss = (y[2] + lad[2]).sum()  # the infinite elements' outputs unused
        finally:
            fastflow.set_validate_args(previous)
        loss.backward()
        return [t.grad.cpu() for t in (x, *params)]

    g = grads(x)
    assert all(torch.isfinite(t).all() for t in g), g
    assert g[0][0, 0] == 0 and g[0][1, 1] == 0
    # Only row 2 feeds the loss: the same as with finite values in place of the infinities.
    g_finite = grads(torch.where(torch.isinf(x), torch.zeros_like(x), x))
    for a, b in zip(g, g_finite, strict=True):
        torch.testing.assert_close(a, b)


# Scales beyond the dtype's range: 1/s = exp(-log_scale) overflows (log_scale below about
# -88.7 in float32, -709.8 in float64), so u = (x - loc)/s is +-inf, or 0 * inf at x == loc.


def _saturated_limit(x, loc, log_scale, kind):
    """The logit output's logabsdet (float64 numpy) where every component lies beyond float
    range on one side of x: 1 - F (or F) is dominated by the component with the smallest
    |u_k|, k* = argmin_k log|x - loc_k| - log_scale_k, and f / (1 - F) tends to its hazard
    over its scale. The logistic hazard c/(1 - C) tends to 1 (lad = -log s_k*), the
    Gaussian's to |u| (lad = log|x - loc_k*| - 2 log s_k*)."""
    x, loc, ls = (t.detach().double().cpu().numpy() for t in (x, loc, log_scale))
    with np.errstate(divide="ignore"):  # x == loc: -inf, and never the limit's element
        log_u = np.log(np.abs(x[..., None] - loc)) - ls
    k = np.argmin(log_u, axis=-1)[..., None]
    lim = -np.take_along_axis(ls, k, -1)[..., 0]
    if kind == "gaussian":
        lim = lim + np.take_along_axis(log_u, k, -1)[..., 0]
    return lim


SATURATING = [pytest.param(torch.float32, -90.0, id="fp32"),
              pytest.param(torch.float64, -800.0, id="fp64")]


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,log_scale", SATURATING)
def test_scale_beyond_float_range_gives_the_limits(backend, dtype, log_scale, kind, output):
    """One component with 1/s beyond the dtype's range and x - loc = 2.5 or -1: u = +-inf.
    y is +-inf (logit) or 1 and 0 (unit); log f is -inf (its exact value, about -|u|, is not
    representable); the logit logabsdet is its exact finite limit, -log_scale (logistic) or
    log|x - loc| - 2 log_scale (Gaussian), not NaN (the regression: logistic, float32, x - loc = 1,
    log_scale = -90 gave y = inf and logabsdet = NaN; float64 gives 90)."""
    x = torch.tensor([2.5, -1.0], dtype=dtype)
    params = [torch.zeros(2, 1, dtype=dtype), torch.zeros(2, 1, dtype=dtype),
              torch.full((2, 1), log_scale, dtype=dtype)]
    y, lad = _fwd(x, params, kind, output)
    inf = math.inf
    if output == "logit":
        torch.testing.assert_close(y, torch.tensor([inf, -inf], dtype=dtype))
        want = [-log_scale, -log_scale]
        if kind == "gaussian":
            want = [math.log(2.5) - 2 * log_scale, -2 * log_scale]
        torch.testing.assert_close(lad, torch.tensor(want, dtype=dtype), rtol=1e-6, atol=0)
    else:
        if y is not None:
            torch.testing.assert_close(y, torch.tensor([1.0, 0.0], dtype=dtype))
        torch.testing.assert_close(lad, torch.tensor([-inf, -inf], dtype=dtype))


def _log_std(u: float, kind: str):
    """(log C, log(1 - C), log c) of the standard component at a moderate u (float64)."""
    if kind == "logistic":
        log_c = -math.log1p(math.exp(-u))
        log_s = -math.log1p(math.exp(u))
        return log_c, log_s, log_c + log_s
    r = u / math.sqrt(2)
    return (math.log(0.5 * math.erfc(-r)), math.log(0.5 * math.erfc(r)),
            -0.5 * u * u - 0.5 * math.log(2 * math.pi))


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,log_scale", SATURATING)
def test_x_at_loc_with_scale_beyond_float_range(backend, dtype, log_scale, kind, output):
    """x == loc exactly with 1/s beyond the dtype's range: u = 0, not 0 * inf = NaN, and
    every output is finite: f is dominated by that component's c(0)/s. Element 0 mixes it
    (pi = 1/2) with an ordinary component at u = -0.5; element 1 has two such components
    (log_scale and log_scale - 5)."""
    x = torch.tensor([0.25, -3.0], dtype=dtype)
    logits = torch.zeros(2, 2, dtype=dtype)
    loc = torch.tensor([[0.25, 0.75], [-3.0, -3.0]], dtype=dtype)
    ls = torch.tensor([[log_scale, 0.0], [log_scale, log_scale - 5.0]], dtype=dtype)
    y, lad = _fwd(x, [logits, loc, ls], kind, output)
    # Exact values in float64 from the components' terms (log 1/2 each weight).
    h = math.log(0.5)
    lc0, ls0, lp0 = _log_std(0.0, kind)
    lc1, ls1, lp1 = _log_std(-0.5, kind)
    log_F = [np.logaddexp(h + lc0, h + lc1), lc0]
    log_S = [np.logaddexp(h + ls0, h + ls1), ls0]
    log_f = [np.logaddexp(h + lp0 - log_scale, h + lp1),
             np.logaddexp(h + lp0 - log_scale, h + lp0 - log_scale + 5.0)]
    if output == "logit":
        want_y = [a - b for a, b in zip(log_F, log_S, strict=True)]
        want_lad = [a - b - c for a, b, c in zip(log_f, log_F, log_S, strict=True)]
    else:
        want_y, want_lad = [math.exp(a) for a in log_F], log_f
    torch.testing.assert_close(lad, torch.tensor(want_lad, dtype=dtype), rtol=1e-6, atol=1e-6)
    if y is not None:
        torch.testing.assert_close(y, torch.tensor(want_y, dtype=dtype), rtol=1e-6, atol=1e-6)


def _extreme_batch(dtype, n=160, K=4):
    """Random elements whose components mix ordinary scales (log_scale in [-1, 1]) with
    scales beyond the dtype's range, log_scale in [-700, -80] (float32) or [-800, -700]
    (float64), at |x - loc| in [1, 4]. Element i: i % 4 == 0, some extreme components and
    at least one ordinary one near x; 1, all extreme on one side of x (1 - F or F is 0);
    2, all extreme on both sides; 3 (float32 only), as 0 with x == loc on an extreme one.
    Returns x, (logits, loc, log_scale) and the element types."""
    lo, hi = (-700.0, -80.0) if dtype == torch.float32 else (-800.0, -700.0)
    typ = torch.arange(n) % 4
    if dtype == torch.float64:
        typ = torch.where(typ == 3, 0, typ)
    x = torch.randn(n, dtype=torch.float64)
    logits = (torch.rand(n, K, dtype=torch.float64) * 2 - 1) * 3.0
    extreme = torch.rand(n, K) < 0.5
    extreme[:, -1] = False
    extreme[:, 0] |= typ == 3
    extreme |= ((typ == 1) | (typ == 2)).unsqueeze(-1)
    dist = 1.0 + 3.0 * torch.rand(n, K, dtype=torch.float64)
    sign = torch.where(torch.rand(n, K) < 0.5, -1.0, 1.0).double()
    sign = torch.where((typ == 1).unsqueeze(-1), sign[:, :1], sign)
    sign[:, 1] = torch.where(typ == 2, -sign[:, 0], sign[:, 1])
    loc_far = x.unsqueeze(-1) - sign * dist
    loc_near = x.unsqueeze(-1) + torch.randn(n, K, dtype=torch.float64)
    loc = torch.where(extreme, loc_far, loc_near)
    loc[:, 0] = torch.where(typ == 3, x, loc[:, 0])
    ls_far = lo + (hi - lo) * torch.rand(n, K, dtype=torch.float64)
    ls_near = torch.rand(n, K, dtype=torch.float64) * 2 - 1
    log_scale = torch.where(extreme, ls_far, ls_near)
    x, logits, loc, log_scale = (t.to(dtype) for t in (x, logits, loc, log_scale))
    loc[:, 0] = torch.where(typ == 3, x, loc[:, 0])  # exactly, after rounding
    return x, [logits, loc, log_scale], typ


def _all_extreme_expected(x, logits, loc, log_scale, kind):
    """(log F, log(1 - F), log f) in float64 numpy of elements whose components all have
    |u| above 1e300. The side of each C and 1 - C near 1 is exactly 1; the other side and
    the density c are e^-|u| (logistic: log(1 + e^-|u|) = 0 there; -inf once |u|
    overflows) or carry e^(-u^2 / 2) = 0 (Gaussian). Each sum is then the sum of its
    terms' logarithms' maximum, or of the weights on its side of x."""
    x, logits, loc, ls = (t.detach().double().cpu().numpy() for t in (x, logits, loc, log_scale))
    log_pi = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    d = x[..., None] - loc
    with np.errstate(over="ignore"):
        abs_u = np.exp(np.log(np.abs(d)) - ls)
    assert (abs_u > 1e300).all()
    tail = -abs_u if kind == "logistic" else np.full_like(abs_u, -np.inf)
    log_F = np.logaddexp.reduce(log_pi + np.where(d > 0, 0.0, tail), axis=-1)
    log_S = np.logaddexp.reduce(log_pi + np.where(d < 0, 0.0, tail), axis=-1)
    log_f = np.max(log_pi + tail - ls, axis=-1)
    return log_F, log_S, log_f


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_random_scales_beyond_float_range_match_float64(backend, dtype, kind, output):
    """No NaN anywhere, and the exact values as far as the dtype represents them. float32:
    float64 at the same inputs (its 1/s is finite down to log_scale = -709), cast to
    float32 (so values beyond float32's range are +-inf), and where float64 saturates too
    (Gaussian, u^2 past float64's range) the analytic limit of the logit logabsdet.
    float64, where no wider dtype helps: an extreme component is then a step function of x
    (its C is exactly 0 or 1 and its density term e^-|u| / s is 0 next to an ordinary
    component's), which float64 at log_scale = -700 reproduces where an ordinary component
    is present; elements all of whose components are extreme take the step model
    (``_all_extreme_expected``), and on one side of x the analytic limit."""

    x, params, typ = _extreme_batch(dtype)
    y, lad = _fwd(x, params, kind, output)
    assert not torch.isnan(lad).any()
    if y is not None:
        assert not torch.isnan(y).any()
    if output == "logit":
        assert torch.isfinite(lad[typ != 2]).all()
    x64, (logits64, loc64, ls64) = x.double(), [p.double() for p in params]
    if dtype == torch.float64:
        ls64 = ls64.clamp(min=-700.0)
    with torch.no_grad():
        y64, lad64 = naive.forward(x64, logits64, loc64, ls64, kind, output)
    if dtype == torch.float64:
        far = typ != 0
        log_F, log_S, log_f = (torch.from_numpy(a) for a in _all_extreme_expected(
            x[far], *(p[far] for p in params), kind))
        if output == "logit":
            y64[far], lad64[far] = log_F - log_S, log_f - log_F - log_S
        else:
            lad64[far] = log_f
            if y64 is not None:
                y64[far] = torch.exp(log_F)
    if output == "logit":
        # Also where float64's y is finite but its tail sum is a single e^-|u| (all on one
        # side of x): the logistic hazard 1 - e^-|u| is 1 there, and log f - log(1 - F)
        # cancels in the step model.
        limit = torch.from_numpy(_saturated_limit(x, params[1], params[2], kind))
        lad64 = torch.where(torch.isinf(y64) | (typ == 1), limit, lad64)
    torch.testing.assert_close(lad.double(), lad64.to(dtype).double(), rtol=1e-5, atol=1e-5)
    if y is not None:
        torch.testing.assert_close(y.double(), y64.to(dtype).double(), rtol=1e-5, atol=1e-6)


def _grads_of_finite_outputs(x, params, kind, output):
    """Grads of sum(w y) + sum(w' lad) over the finite outputs only (random weights w, w'),
    and the outputs: an infinite y or lad gets a zero cotangent."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y, lad = _fwd(leaves[0], leaves[1:], kind, output)
    gen = torch.Generator(device="cpu").manual_seed(7)
    w_lad = torch.randn(lad.shape, generator=gen, dtype=torch.float64).to(lad)
    loss = torch.where(torch.isfinite(lad), lad * w_lad, 0.0).sum()
    w_y = torch.randn(lad.shape, generator=gen, dtype=torch.float64).to(lad)
    if y is not None:
        loss = loss + torch.where(torch.isfinite(y), y * w_y, 0.0).sum()
    return y, lad, w_lad, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,log_scale", SATURATING)
def test_gradients_beyond_float_range_are_the_limits(backend, dtype, log_scale, kind,
                                                     output):
    """The elements of test_scale_beyond_float_range_gives_the_limits (one component,
    x - loc = 2.5 and -1, 1/s overflowing), with a second component farther out
    (log_scale - 3 at x - loc = 2 and -1.5), and an element
    with x == loc. The logit logabsdet, -log s* (logistic) or log|x - loc*| - 2 log s*
    (Gaussian), has those gradients; "unit" y (1 or 0) and the density have none; at
    x == loc the logits' and log-scales' gradients are finite (x's and loc's overflow)."""
    x = torch.tensor([2.5, -1.0, 0.25], dtype=dtype)
    logits = torch.tensor([[0.3, -0.2]] * 3, dtype=dtype)
    loc = torch.tensor([[0.0, 0.5], [0.0, 0.5], [0.25, 0.75]], dtype=dtype)
    ls = torch.tensor([[log_scale, log_scale - 3.0]] * 2 + [[log_scale, 0.0]], dtype=dtype)
    y, lad, w, grads = _grads_of_finite_outputs(x, [logits, loc, ls], kind, output)
    for g in grads:
        assert not torch.isnan(g).any()
    g_x, g_logits, g_loc, g_ls = (g[:2] for g in grads)
    zero = torch.zeros(2, dtype=dtype)
    if output == "logit":
        d = torch.tensor([2.5, -1.0], dtype=dtype)
        want_x = w[:2] / d if kind == "gaussian" else zero
        want_ls = w[:2] * (-2.0 if kind == "gaussian" else -1.0)
    else:
        want_x = want_ls = zero
    torch.testing.assert_close(g_x, want_x)
    torch.testing.assert_close(g_loc, torch.stack([-want_x, zero], -1))
    torch.testing.assert_close(g_ls, torch.stack([want_ls, zero], -1))
    torch.testing.assert_close(g_logits, torch.zeros(2, 2, dtype=dtype))
    assert torch.isfinite(grads[1][2]).all() and torch.isfinite(grads[3][2]).all()


@pytest.mark.parametrize("output", [*OUTPUTS, "density"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_random_gradients_beyond_float_range(backend, monkeypatch, dtype, kind, output):
    """``_extreme_batch``'s elements, the loss over the finite outputs: no gradient is NaN.
    With an ordinary component present (type 0) they are float64's (the reference at
    float64 inputs, log_scale clamped to -700 for float64: extreme components are steps
    either way, with zero gradients in x, loc and log_scale); logit elements all on one
    side of x (type 1) with y = +-inf have the logabsdet limit's gradients (k* as in
    ``_saturated_limit``: d/dlog s* = -1, or -2 with d/dx = -d/dloc* = 1 / (x - loc*) for
    the Gaussian)."""
    x, params, typ = _extreme_batch(dtype)
    x64, params64 = x.double(), [p.double() for p in params]
    if dtype == torch.float64:
        params64[2] = params64[2].clamp(min=-700.0)
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    _, _, _, want = _grads_of_finite_outputs(x64, params64, kind, output)
    monkeypatch.setenv("FASTFLOW_BACKEND", backend)
    y, lad, w, grads = _grads_of_finite_outputs(x, params, kind, output)
    for g in grads:
        assert not torch.isnan(g).any()
    near = typ == 0
    for g, g64 in zip(grads, want, strict=True):
        assert torch.isfinite(g[near]).all()
        torch.testing.assert_close(g[near].double(), g64[near], rtol=1e-4, atol=1e-4)
    if output == "logit":
        one = (typ == 1) & torch.isinf(y)  # else a finite y's gradient (about 1/s) adds in
        x1, loc1, ls1 = x[one].double(), params[1][one].double(), params[2][one].double()
        k = (torch.log((x1.unsqueeze(-1) - loc1).abs()) - ls1).argmin(-1, keepdim=True)
        hot = torch.zeros_like(ls1).scatter_(-1, k, 1.0)
        w1 = w[one].double()
        d = (x1 - loc1.gather(-1, k).squeeze(-1))
        g_x = w1 / d if kind == "gaussian" else torch.zeros_like(w1)
        g_ls = w1.unsqueeze(-1) * hot * (-2.0 if kind == "gaussian" else -1.0)
        torch.testing.assert_close(grads[0][one].double(), g_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1][one].double(), torch.zeros_like(hot))
        torch.testing.assert_close(grads[2][one].double(), -g_x.unsqueeze(-1) * hot,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[3][one].double(), g_ls, rtol=1e-5, atol=1e-6)
