"""mixture_cdf_inverse: the accuracy contract against an independent float64 root, kernels
against the reference (outputs and implicit-differentiation gradients), boundaries, round trips."""

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
    oracle_forward,
    oracle_root,
    random_mixture,
    sample_x,
)

KINDS = ["logistic", "gaussian"]
OUTPUTS = ["unit", "logit"]


def _targets(shape, output, device):
    """Targets over the contract's range: |logit| <= 80, or z in [1e-30, 1 - 1e-7]."""
    n = int(np.prod(shape))
    if output == "logit":
        t = torch.linspace(-80.0, 80.0, n, dtype=torch.float64)
    else:
        lo = torch.logspace(-30, np.log10(0.5), n // 2, dtype=torch.float64)
        hi = 1.0 - torch.logspace(-7, np.log10(0.5), n - n // 2, dtype=torch.float64)
        t = torch.cat([lo, hi])
    return t[torch.randperm(n)].reshape(shape).float().to(device)


@pytest.mark.parametrize("K", [1, 3, 64])
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_accuracy_contract(backend, kind, output, K):
    """Either x is within 1e-5 (|x*| + min_k s_k) of the float64 root x*, or the float64
    forward map at x is within 1e-5 max(1, |y|) of y (where the map is flat)."""
    shape = (4, 32)
    params = random_mixture(shape, K, device=DEVICE, logit_spread=50.0,
                            log_scale_range=(-10.0, 10.0), loc_spread=3.0)
    y = _targets(shape, output, DEVICE)
    x, lad = fastflow.mixture_cdf_inverse(y, *params, kind=kind, output=output)
    assert torch.isfinite(x).all() and torch.isfinite(lad).all()
    x_star = oracle_root(y, *params, kind, output)
    s_min = torch.exp(params[2]).amin(-1).double().cpu().numpy()
    xn = x.double().cpu().numpy()
    close_x = np.abs(xn - x_star) <= 1e-5 * (np.abs(x_star) + s_min)
    y_at_x, _ = oracle_forward(x, *params, kind, output)
    yn = y.double().cpu().numpy()
    close_y = np.abs(y_at_x - yn) <= 1e-5 * np.maximum(1.0, np.abs(yn))
    bad = ~(close_x | close_y)
    assert not bad.any(), (
        f"{bad.sum()} targets missed, e.g. y={yn[bad][:3]}, x={xn[bad][:3]}, x*={x_star[bad][:3]}"
    )


def _inverse_with_grads(backend, monkeypatch, y, params, kind, output):
    monkeypatch.setenv("FASTFLOW_BACKEND", backend)
    leaves = [t.detach().clone().requires_grad_() for t in (y, *params)]
    x, lad = fastflow.mixture_cdf_inverse(*leaves, kind=kind, output=output)
    gen = torch.Generator().manual_seed(3)
    wx, wl = (torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x) for _ in range(2))
    grads = torch.autograd.grad((x * wx).sum() + (lad * wl).sum(), leaves)
    return x, lad, grads


def _assert_solves_as_well(got, want, y, params, kind, output, tol=5e-5):
    """Each kernel solution within tol of the reference's, or solving F(x) = y as well: its
    float64 residual in logit space (where both tails are resolved) within twice the
    reference's plus a few ulps of the target and of x (times the map's slope there); and its
    logabsdet that of the float64 map at its own x, where it differs from the reference's."""
    (xg, lg), (xw, lw) = (_np(t) for t in got[:2]), (_np(t) for t in want[:2])
    same = np.isclose(xg, xw, rtol=tol, atol=tol)
    yn = _np(y)
    with np.errstate(divide="ignore"):
        target = yn if output == "logit" else np.log(yn) - np.log1p(-yn)
    og, ow = (oracle(t, *params, kind) for t in (got[0], want[0]))
    eps = np.finfo(np.float32).eps
    slack = 4 * eps * (np.maximum(1.0, np.abs(target)) + np.abs(xw) * np.exp(ow["logit_lad"]))
    r_got, r_want = np.abs(og["logit"] - target), np.abs(ow["logit"] - target)
    bad = ~(same | (r_got <= 2 * r_want + slack))
    assert not bad.any(), (f"{bad.sum()} solutions differ from the reference's and solve worse: "
                           f"y={yn[bad][:3]}, x={xg[bad][:3]}, reference x={xw[bad][:3]}")
    lad_at_x = og["log_f"] if output == "unit" else og["logit_lad"]
    lad_ok = np.isclose(lg, lw, rtol=tol, atol=tol) | np.isclose(lg, -lad_at_x, rtol=tol, atol=tol)
    assert lad_ok.all(), (f"logabsdet {lg[~lad_ok][:3]}, reference {lw[~lad_ok][:3]}, "
                          f"float64 map at x {-lad_at_x[~lad_ok][:3]}")


def _np(t):
    return t.detach().double().cpu().numpy()


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,K,shared", [
    pytest.param((5, 123), 3, False, id="5x123-K3"),
    pytest.param((5, 123), 1, True, id="5x123-K1-shared"),
    pytest.param((3, 40), 10, True, id="3x40-K10-shared"),
    pytest.param((7, 33), 4, False, id="7x33-K4-dense"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_kernel_matches_reference(monkeypatch, dtype, shape, K, shared, kind, output):
    params = random_mixture(shape, K, dtype=dtype, device=DEVICE, shared=shared)
    x0 = sample_x(*params, shape, 6.0)
    y, _ = fastflow.mixture_cdf(x0, *params, kind=kind, output=output)
    if output == "unit":  # keep away from fp32's z = 1, where x is +inf by design
        y = y.clamp(1e-6, 1 - 1e-6)
    got = _inverse_with_grads("triton", monkeypatch, y, params, kind, output)
    want = _inverse_with_grads("reference", monkeypatch, y, params, kind, output)
    if dtype == torch.float64:
        tol = dict(rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)
        assert_close_grads(got[2], want[2], **tol, names=("y", "logits", "loc", "log_scale"))
        return
    # float32: the two solutions may differ by rounding, and dx/dz = 1/f amplifies that where
    # the density is low (between narrow components, in the tails). Where they differ, the
    # kernel's x must solve the equation as well as the reference's (float64 residuals) and
    # its logabsdet match the float64 map at its own x. Then both backward ops at one common
    # solution, each judged against the float64 reference there.
    _assert_solves_as_well(got, want, y, params, kind, output)
    x = want[0]
    full = (*shape, K)
    expanded = [p.expand(full) for p in params]
    cot = [torch.randn(shape, device=DEVICE) for _ in range(2)]
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    g_kernel = torch.ops.fastflow.mixture_cdf_inverse_bwd(*cot, x, *expanded, kind, output)
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    g_ref = torch.ops.fastflow.mixture_cdf_inverse_bwd(*cot, x, *expanded, kind, output)
    g_true = torch.ops.fastflow.mixture_cdf_inverse_bwd(
        *[t.double() for t in (*cot, x, *expanded)], kind, output)
    # exp(-lad) turns the float32 rounding of lad (|lad| ulps) into a relative error.
    lad_ulps = 8 * torch.finfo(torch.float32).eps * (1.0 + want[1].double().abs())
    for name, g, w, t in zip(("y", "logits", "loc", "log_scale"), g_kernel, g_ref, g_true,
                             strict=True):
        err_kernel = (g.double() - t).abs()
        err_ref = (w.double() - t).abs()
        rel = 1e-5 + (lad_ulps if t.dim() == x.dim() else lad_ulps.unsqueeze(-1))
        bound = 2.0 * err_ref + rel * (1.0 + t.abs())
        i = torch.argmax(err_kernel - bound)
        assert (err_kernel <= bound).all(), (
            f"{name}: kernel error {err_kernel.flatten()[i]:.3g}, reference error "
            f"{err_ref.flatten()[i]:.3g}, value {t.flatten()[i]:.3g}"
        )


@pytest.mark.parametrize("shape,K", [
    # several programs of the backward even under the interpreter (16384-lane tiles):
    # 3 tiles of 4096 elements (K = 3), 8 of 256 (K = 64)
    pytest.param((3, 3000), 3, id="3x3000-K3"),
    pytest.param((16, 128), 64, id="16x128-K64"),
])
def test_backward_kernel_over_several_programs_matches_reference(monkeypatch, shape, K):
    """The inverse's backward kernel where the launch has more than one program: each program
    must read and write its own tile of elements (float64, at a given solution x)."""
    from fastflow.kernels.launch import cdiv, param_views, tile
    from fastflow.kernels.mixture_cdf import LAUNCH

    params = random_mixture(shape, K, dtype=torch.float64, device=DEVICE)
    x = sample_x(*params, shape, 6.0)
    assert cdiv(x.numel(), tile(param_views(x, *params)[3], LAUNCH)[0]) > 1
    cot = [torch.randn(shape, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    grads = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("FASTFLOW_BACKEND", backend)
        grads[backend] = torch.ops.fastflow.mixture_cdf_inverse_bwd(*cot, x, *params,
                                                                    "logistic", "logit")
    assert_close_grads(grads["triton"], grads["reference"], rtol=1e-9, atol=1e-9,
                       names=("y", "logits", "loc", "log_scale"))


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_logabsdet(backend, kind, output):
    params = random_mixture((6, 20), 5, dtype=torch.float64, device=DEVICE)
    x0 = sample_x(*params, (6, 20), 8.0)
    y, lad_fwd = fastflow.mixture_cdf(x0, *params, kind=kind, output=output)
    x, lad_inv = fastflow.mixture_cdf_inverse(y, *params, kind=kind, output=output)
    y1, lad_at_x = fastflow.mixture_cdf(x, *params, kind=kind, output=output)
    torch.testing.assert_close(y1, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lad_inv, -lad_at_x, rtol=1e-12, atol=1e-12)
    if output == "logit":  # well conditioned; unit targets near 1 are not, in any precision
        torch.testing.assert_close(x, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(lad_inv, -lad_fwd, rtol=1e-9, atol=1e-9)


def _counting_density_slope(monkeypatch):
    """Calls of the CPU solve's last-iteration logabsdet path, recorded."""
    from fastflow.reference import mixture_inverse as cpu

    calls = []
    make = cpu._evaluator

    def counting(*args):
        evaluate, density_slope = make(*args)
        return evaluate, lambda x: calls.append(1) or density_slope(x)

    monkeypatch.setattr(cpu, "_evaluator", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_logabsdet_from_the_last_iteration(monkeypatch, kind, output, dtype):
    """When every element converges by Newton's step, the CPU solve takes the logabsdet at
    the new x from the last iteration's evaluation at x (plus the step times its derivative)
    instead of evaluating again: that path must run here and agree with the independent
    float64 forward at the returned x, as tightly as an evaluation at x would."""
    from fastflow.reference import mixture_inverse as cpu

    calls = _counting_density_slope(monkeypatch)
    torch.manual_seed(0)
    params = random_mixture((4096,), 8, dtype=dtype)
    x0 = sample_x(*params, (4096,), 4.0).to(dtype)  # unit targets short of 1 in float32
    y, _ = naive.forward(x0, *params, kind, output)
    x, lad = cpu.mixture_cdf_inverse_fwd(y, *params, kind, output)
    assert calls, "the solve did not end on the last-iteration path"
    expect = oracle(x.double(), *(p.double() for p in params), kind)
    lad_at_x = expect["logit_lad"] if output == "logit" else expect["log_f"]
    tol = 4e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(-lad.double().numpy(), lad_at_x, rtol=tol, atol=tol)


def test_cpu_logabsdet_correction_takes_the_step_taken(monkeypatch):
    """The last-iteration logabsdet moves by the step x actually took (Newton's d rounded into
    x), not by d: with a narrow component (s = e^-7.07) the half ulp between them times the
    logabsdet's slope (about u / s) was 1.65e-4 off in float32, where an evaluation at x is
    5e-7 off."""
    from fastflow.reference import mixture_inverse as cpu

    calls = _counting_density_slope(monkeypatch)
    params = [torch.tensor([v]) for v in (
        [-0.753308892250061, -0.8250265717506409, 0.2062089592218399],
        [1.1203248500823975, 0.12307325750589371, -1.0332531929016113],
        [-7.0730133056640625, 0.2200731784105301, -0.8600203990936279])]
    y = torch.tensor([3.083138942718506])
    x, lad = cpu.mixture_cdf_inverse_fwd(y, *params, "gaussian", "logit")
    assert calls, "the solve did not end on the last-iteration path"
    lad_at_x = oracle(x.double(), *(p.double() for p in params), "gaussian")["logit_lad"]
    np.testing.assert_allclose(-lad.double().numpy(), lad_at_x, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_boundaries_give_infinities_not_nan(backend, kind, output):
    """Targets z = 0 and 1 (unit) or y = -inf and +inf (logit): x = -+inf, logabsdet +inf,
    and zero gradients there."""
    params = [t.requires_grad_() for t in random_mixture((4,), 3, device=DEVICE)]
    values = ([0.0, 1.0, 0.5, 1e-30] if output == "unit"
              else [-float("inf"), float("inf"), 0.0, -60.0])
    z = torch.tensor(values, device=DEVICE, requires_grad=True)
    x, lad = fastflow.mixture_cdf_inverse(z, *params, kind=kind, output=output)
    assert x[0] == -float("inf") and x[1] == float("inf")
    assert torch.isfinite(x[2:]).all()
    assert (lad[:2] == float("inf")).all() and torch.isfinite(lad[2:]).all()
    # Unit cotangents on every output, the boundary ones included: the op itself must zero them.
    grads = torch.autograd.grad([x, lad], [z, *params], [torch.ones_like(x), torch.ones_like(lad)])
    for g in grads:
        assert torch.isfinite(g).all()
        # x is +-inf there whatever the parameters: every gradient of the boundary elements
        # (per element here) is zero, the parameters' included.
        assert (g[:2] == 0).all()
    assert all((g[2:] != 0).any() for g in grads)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fp64(backend, kind, output):
    params = random_mixture((2, 3), 3, dtype=torch.float64, device=DEVICE, shared=True)
    x0 = sample_x(*params, (2, 3), 3.0)
    y, _ = fastflow.mixture_cdf(x0, *params, kind=kind, output=output)
    leaves = [t.clone().requires_grad_() for t in (y, *params)]
    fast = backend == "triton" and not HAS_CUDA
    assert torch.autograd.gradcheck(
        lambda *a: fastflow.mixture_cdf_inverse(*a, kind=kind, output=output), leaves,
        fast_mode=fast,
    )


def test_out_of_domain_targets_give_nan_when_not_validated(backend):
    params = random_mixture((3,), 2, device=DEVICE)
    z = torch.tensor([-0.5, 1.5, float("nan")], device=DEVICE)
    x, lad = fastflow.mixture_cdf_inverse(z, *params, validate_args=False)
    assert torch.isnan(x).all() and torch.isnan(lad).all()


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), output=st.sampled_from(OUTPUTS), K=st.integers(1, 8),
       x=st.floats(-40, 40), seed=st.integers(0, 2**31 - 1))
def test_property_round_trip(kind, output, K, x, seed):
    gen = torch.Generator().manual_seed(seed)
    logits, loc = torch.randn(2, K, generator=gen, dtype=torch.float64) * 4
    log_scale = torch.rand(K, generator=gen, dtype=torch.float64) * 6 - 3
    x0 = torch.tensor([x], dtype=torch.float64)
    y, lad = fastflow.mixture_cdf(x0, logits, loc, log_scale, kind=kind, output=output)
    if output == "unit" and not (0.0 < y.item() < 1.0):
        return  # the map saturates in float64 itself: nothing to invert
    x1, lad_inv = fastflow.mixture_cdf_inverse(y, logits, loc, log_scale, kind=kind, output=output)
    y1, _ = fastflow.mixture_cdf(x1, logits, loc, log_scale, kind=kind, output=output)
    assert abs(y1.item() - y.item()) <= 1e-9 * max(1.0, abs(y.item()))
    assert torch.isfinite(lad_inv).all()


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_solver_matches_the_kernels_algorithm(kind):
    """The CPU solver (Newton run to convergence, probability-space sums) and the kernels'
    fixed-count log-space algorithm find the same roots in float64, hard mixtures included;
    with no Newton iterations allowed, every element takes the log-space fallback (bisection
    in the floats' integer order), which finds them too."""
    from fastflow.reference import mixture_inverse as ref

    shape = (8, 64)
    params = random_mixture(shape, 5, dtype=torch.float64, logit_spread=20.0,
                            log_scale_range=(-6.0, 6.0), loc_spread=3.0)
    y = _targets(shape, "logit", "cpu").double() * 10.0  # |logit| to 800: both paths run
    fixed = naive.inverse_fixed(y, *params, kind, "logit", 60, 4)
    adaptive = ref.mixture_cdf_inverse_fwd(y, *params, kind, "logit")
    forced = ref.mixture_cdf_inverse_fwd(y, *params, kind, "logit", max_steps=0)
    scale = torch.exp(params[2]).amin(-1)
    assert ((adaptive[0] - fixed[0]).abs() <= 1e-9 * (fixed[0].abs() + scale)).all()
    torch.testing.assert_close(adaptive[1], fixed[1], rtol=1e-7, atol=1e-7)
    assert ((forced[0] - fixed[0]).abs() <= 1e-9 * (fixed[0].abs() + scale)).all()
    torch.testing.assert_close(forced[1], fixed[1], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_inverse_logabsdet_against_float64_oracle(backend, kind, output):
    """The inverse's logabsdet is minus the float64 forward logabsdet at the returned x, to
    the forward's contract: 1e-5 max(1, |lad|). (The CPU solver forms it in probability
    space, log(f / (F (1 - F))) as one quotient; the kernels in log space.) Gaussian logit
    outputs carry the forward's known conditioning exception, hence the factor 2 there."""
    shape = (16, 64)
    params = random_mixture(shape, 3, device=DEVICE, logit_spread=50.0,
                            log_scale_range=(-10.0, 10.0), loc_spread=3.0)
    y = _targets(shape, output, DEVICE)
    x, lad = fastflow.mixture_cdf_inverse(y, *params, kind=kind, output=output)
    _, lad_true = oracle_forward(x, *params, kind, output)
    err = np.abs(lad.double().cpu().numpy() + lad_true) / np.maximum(1.0, np.abs(lad_true))
    factor = 2.0 if (kind, output) == ("gaussian", "logit") else 1.0
    assert np.max(err) <= factor * 1e-5, f"worst {np.max(err):.3g}"


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_inverse_logabsdet_where_the_density_underflows(backend, kind, output):
    """A component of weight e^-70 alone below a far one: the float32 solutions of these
    targets lie where f underflows float32 (|logabsdet| up to 1e5), and the logabsdet must
    come from log space there, not as log of a flushed f (inf). Bound: the forward's
    contract, 1e-5 max(1, |logabsdet|)."""

    logits = torch.tensor([[-70.0, 0.0]], device=DEVICE)
    loc = torch.tensor([[0.0, 1000.0]], device=DEVICE)
    log_scale = torch.zeros(1, 2, device=DEVICE)
    y = torch.tensor([-70.0, -69.8, -69.5] if output == "logit" else [1e-30, 4e-31, 1e-31],
                     device=DEVICE)
    x, lad = fastflow.mixture_cdf_inverse(y, logits, loc, log_scale, kind=kind, output=output)
    _, lad64 = naive.forward(x.double(), logits.double(), loc.double(), log_scale.double(),
                            kind, output)
    assert torch.isfinite(lad).all()
    err = (lad.double() + lad64).abs() / lad64.abs().clamp(min=1.0)
    assert err.max() <= 1e-5, f"worst {err.max():.3g}"


@pytest.mark.parametrize("K", [1, 10])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_kernel_inverse_on_hard_mixtures(monkeypatch, dtype, kind, K):
    """The kernels' Newton iteration (per-tile early exit) on mixtures whose scales span
    e^-10..e^10, targets out to |logit| 80 in float32 and 700 in float64: x within
    tol (|x*| + min_k s_k) of the float64 root or, where the map is flat, the float64 map at
    x within tol max(1, |t|) of t; the logabsdet is minus the float64 forward's at x."""
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    shape = (4, 64)
    params = random_mixture(shape, K, dtype=dtype, device=DEVICE, logit_spread=50.0,
                            log_scale_range=(-10.0, 10.0), loc_spread=3.0)
    lim, tol = (80.0, 1e-5) if dtype == torch.float32 else (700.0, 1e-11)
    n = int(np.prod(shape))
    t = torch.linspace(-lim, lim, n, dtype=torch.float64)[torch.randperm(n)]
    t = t.reshape(shape).to(dtype=dtype, device=DEVICE)
    x, lad = fastflow.mixture_cdf_inverse(t, *params, kind=kind, output="logit")
    assert x.dtype == dtype and torch.isfinite(x).all() and torch.isfinite(lad).all()
    x_star = oracle_root(t, *params, kind, "logit")
    s_min = torch.exp(params[2]).amin(-1).double().cpu().numpy()
    xn, tn = x.double().cpu().numpy(), t.double().cpu().numpy()
    y_at_x, lad_true = oracle_forward(x, *params, kind, "logit")
    close_x = np.abs(xn - x_star) <= tol * (np.abs(x_star) + s_min)
    close_y = np.abs(y_at_x - tn) <= tol * np.maximum(1.0, np.abs(tn))
    bad = ~(close_x | close_y)
    assert not bad.any(), (
        f"{bad.sum()} targets missed, e.g. t={tn[bad][:3]}, x={xn[bad][:3]}, x*={x_star[bad][:3]}"
    )
    err = np.abs(lad.double().cpu().numpy() + lad_true) / np.maximum(1.0, np.abs(lad_true))
    factor = 2.0 if kind == "gaussian" else 1.0
    assert np.max(err) <= factor * tol, f"logabsdet: worst {np.max(err):.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_inverse_stops_early(kind):
    """Each tile stops once all its elements have converged: a few iterations on typical
    mixtures (the fixed schedule took 44, Newton steps up to 6), and neither the padded lanes
    of a partial tile nor boundary and NaN targets hold a tile at the cap."""
    from fastflow.kernels import mixture_inverse as kernels

    cap = 44
    K = 8
    shape = (3, 100)  # 300 elements: a partial last tile
    gen = torch.Generator().manual_seed(0)
    logits, loc = (torch.randn((*shape, K), generator=gen) for _ in range(2))
    log_scale = torch.randn((*shape, K), generator=gen) * 0.5
    x0 = torch.randn(shape, generator=gen) * 3
    logits, loc, log_scale, x0 = (v.to(DEVICE) for v in (logits, loc, log_scale, x0))
    y, _ = fastflow.mixture_cdf(x0, logits, loc, log_scale, kind=kind, output="logit")
    y[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    steps = torch.full((kernels.num_programs(y.numel(), K),), -1, dtype=torch.int32,
                       device=DEVICE)
    x, _ = kernels.mixture_cdf_inverse_fwd(y, logits, loc, log_scale, kind, "logit", cap, steps)
    # Halley steps: 3 (logistic) and 4 (Gaussian) iterations for all 300 elements in one
    # interpreted tile; Newton steps took 5 and 6.
    most = {"logistic": 4, "gaussian": 5}[kind]
    assert (steps >= 1).all() and (steps <= most).all(), steps.tolist()
    assert x[0, 0] == float("inf") and x[0, 1] == -float("inf") and torch.isnan(x[0, 2])
    finite = torch.ones(shape, dtype=torch.bool, device=DEVICE)
    finite[0, :3] = False
    torch.testing.assert_close(x[finite], x0[finite], rtol=1e-4, atol=1e-4)


def search_problems(kind, output, n, K, gen, log_scale_max=10.0):
    """n float32 inverse problems over the accuracy contract's ranges, K components each:
    logits uniform in +-50, log_scale uniform in [-10, 10] (+-``log_scale_max``), loc normal
    with a spread drawn per element log-uniformly in [1, 1000] (the other tests' 3 and well
    beyond: a wide spread puts roots where the smallest scale is a few ulps of x or less),
    and targets: for "logit" half uniform in [-80, 80], half the forward map of an x near a
    random component (within 80 logistic or 12 Gaussian scales, where that component's own
    logit is within that range), clamped to it; for "unit" z log-uniform in [1e-30, 1/2] or
    1 - z log-uniform in [1e-7, 1/2].
    Returns (y, logits, loc, log_scale) on the CPU; ``gen`` a torch.Generator."""
    from fastflow.reference import mixture_cdf as ref

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)

    logits = uniform(-50.0, 50.0, n, K)
    log_scale = uniform(-log_scale_max, log_scale_max, n, K)
    spread = 10.0 ** uniform(0.0, 3.0, n, 1)
    loc = torch.randn((n, K), generator=gen, dtype=torch.float64) * spread
    params = [p.float() for p in (logits, loc, log_scale)]
    half = n // 2
    if output == "logit":
        j = torch.randint(0, K, (n - half, 1), generator=gen)
        u_max = 80.0 if kind == "logistic" else 12.0
        x = (loc[half:].gather(1, j) + log_scale[half:].gather(1, j).exp()
             * uniform(-u_max, u_max, n - half, 1)).squeeze(1)
        y_x, _ = ref.mixture_cdf_fwd(x.float(), *(p[half:] for p in params), kind, "logit")
        y = torch.cat([uniform(-80.0, 80.0, half).float(), y_x.clamp(-80.0, 80.0)])
    else:
        lower = 10.0 ** uniform(-30.0, np.log10(0.5), half)
        upper = 1.0 - 10.0 ** uniform(-7.0, np.log10(0.5), n - half)
        y = torch.cat([lower, upper]).float()
    return [y, *params]


def search_misses(x, y, logits, loc, log_scale, kind, output):
    """Per element, whether the float32 solution x misses the accuracy contract: neither
    within 1e-5 (|x| + min_k s_k) of the float64 root (the float64 map at x -+ that tolerance
    must bracket the target) nor, where the map is flat, forward-exact (the float64 map at x
    within 1e-5 max(1, |t|) of t). Judged in logit space for both outputs (t = logit z for
    "unit"): stricter than the unit contract's 1e-5 in z. A boolean numpy array."""
    x64 = x.detach().double().cpu()
    t = y.detach().double().cpu()
    if output == "unit":
        t = torch.log(t) - torch.log1p(-t)
    s_min = log_scale.detach().double().cpu().exp().amin(-1)
    tol = 1e-5 * (x64.abs() + s_min)
    g = {d: oracle(x64 + d * tol, logits, loc, log_scale, kind)["logit"] for d in (-1, 0, 1)}
    tn = t.numpy()
    bracketed = (g[-1] <= tn) & (tn <= g[1])
    exact = np.abs(g[0] - tn) <= 1e-5 * np.maximum(1.0, np.abs(tn))
    return ~((bracketed | exact) & np.isfinite(x64.numpy()))


# A heavy Gaussian component of scale 6e-5 at -111.3: beyond it logit F plateaus at 33.156 (the
# light components' mass), and the root of t = 33.995 lies at 69.087. Newton's first step from
# the plateau's steep edge is a few ulps of x, which once passed for convergence.
_PLATEAU_EDGE = (
    [33.99474334716797],
    [24.521706, 58.288429, 5.980287, -17.986403, 4.762485, 24.331228, 14.294946],
    [69.087662, -111.335091, 19.214783, -41.554214, 30.870413, 20.592421, 101.224831],
    [-7.702768, -9.732655, -8.554873, 9.038186, -9.052904, -3.997133, -6.525165],
)
# logit F rises steeply past a narrow component at 313.63 onto a plateau whose level rounds to
# t + 1.2e-7 in float32 while it lies 9e-9 below t (the float64 root is at 502.84): a bracket a
# few ulps wide closes on the rise, and a point inside it has a residual of 0.04, while its
# upper end is forward-exact.
_ROUNDED_PLATEAU = (
    [0.7490131855010986],
    [44.96665573120117, 39.484004974365234, 36.94327163696289, 34.9424934387207,
     34.706756591796875, 33.6651725769043, 45.4165153503418, 42.28727340698242,
     -31.77665901184082, 46.64724349975586, 28.19918441772461, 33.58414077758789,
     38.907405853271484],
    [502.8587646484375, 1096.413330078125, -811.7891845703125, 91.02235412597656,
     -459.5018310546875, -144.1816864013672, 1900.6341552734375, -983.0616455078125,
     -1903.2381591796875, 313.6300964355469, 1298.9630126953125, -363.1048583984375,
     -1834.26513671875],
    [-5.6268439292907715, -8.22437858581543, 4.433351039886475, -9.312561988830566,
     -6.564741134643555, 0.2850496470928192, -0.3531346321105957, -6.233400821685791,
     -4.706264495849609, -9.799763679504395, -9.206276893615723, 3.977633476257324,
     4.7315568923950195],
)


@pytest.mark.parametrize("case", [_PLATEAU_EDGE, _ROUNDED_PLATEAU],
                         ids=["plateau-edge", "rounded-plateau"])
def test_fp32_inverse_near_a_narrow_components_plateau(backend, case):
    """Regressions (Gaussian, float32, logit output): a Newton step of a few ulps is not
    convergence, and a bracket a few ulps wide need not hold the root where float32 rounds a
    plateau's level across the target. x must meet the accuracy contract (within
    1e-5 (|x*| + min_k s_k) of the float64 root, or forward-exact to 1e-5 max(1, |t|))."""
    y, logits, loc, log_scale = (torch.tensor([v], device=DEVICE) for v in case)
    y = y[0]
    x, lad = fastflow.mixture_cdf_inverse(y, logits, loc, log_scale, kind="gaussian",
                                          output="logit")
    assert torch.isfinite(x).all() and torch.isfinite(lad).all()
    miss = search_misses(x, y, logits, loc, log_scale, "gaussian", "logit")
    x_star = oracle_root(y, logits, loc, log_scale, "gaussian", "logit")
    assert not miss.any(), f"x = {x.tolist()}, float64 root {x_star.tolist()}"


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_inverse_random_search(backend, kind, output):
    """A randomized search over the accuracy contract's ranges (``search_problems``; the same
    search at any size: ``python bench/investigations/inverse_search.py``): every float32 solution
    within 1e-5 (|x*| + min_k s_k) of the float64 root or forward-exact in logit space."""
    _search(kind, output, 4096 if backend == "reference" else 512,
            KINDS.index(kind) * 2 + OUTPUTS.index(output))


def _search(kind, output, n, seed, log_scale_max=10.0):
    gen = torch.Generator().manual_seed(seed)
    for K in (2, 9, 64):
        y, *params = search_problems(kind, output, n, K, gen, log_scale_max)
        x, _ = fastflow.mixture_cdf_inverse(*(v.to(DEVICE) for v in (y, *params)), kind=kind,
                                            output=output)
        miss = search_misses(x, y, *params, kind, output)
        i = np.flatnonzero(miss)[:3]
        assert not miss.any(), (f"K = {K}: {miss.sum()} of {n} missed, e.g. y = {y[i].tolist()}, "
                                f"x = {x.cpu()[i].tolist()}")


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_inverse_random_search_wide_scales(backend, kind, output):
    """The same search with log_scale in +-40, past the contract's range (a network's outputs
    are unbounded): a bracket 10^30 times the smallest scale is not resolved by halving in
    any step cap (1% of these roots were wrong), nor is a short step from a plateau at the
    target's level beside a narrow component's rise safe to take."""
    _search(kind, output, 2048 if backend == "reference" else 256,
            100 + KINDS.index(kind) * 2 + OUTPUTS.index(output), log_scale_max=40.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_inverse_of_a_narrow_component_beside_a_very_wide_one(backend, kind, dtype):
    """log_scale -30 beside 44: the roots (near 1e-13) lie in a bracket of 10^19, which the
    solvers left after their step caps at x = +-1.74 (float64 too); now found in the floats'
    integer order, in both dtypes."""
    params = [torch.tensor(v, dtype=dtype, device=DEVICE)
              for v in ([0.0, -18.0], [0.0, 0.0], [-30.0, 44.0])]
    y = torch.tensor([-5.0, -1.0, 1.0, 5.0], dtype=dtype, device=DEVICE)
    x, lad = fastflow.mixture_cdf_inverse(y, *params, kind=kind, output="logit")
    assert torch.isfinite(lad).all()
    miss = search_misses(x, y, *(p.cpu() for p in params), kind, "logit")
    assert not miss.any(), x.tolist()
    assert (x.abs() < 1e-11).all()


def test_inverse_of_targets_past_half_the_float_range(backend):
    """A root between half the largest float32 and the largest (logit target 2e38 of one
    logistic of scale 1, or the location 3e38 with target -1e38) is that root, not +-inf; a
    root past the largest float is +-inf on its own side (loc 3e38, target 1e38; scale
    e^10 at target 1e36). Regression: the kernels searched only [-M/2, M/2] and returned
    -inf for the last two."""
    t = torch.tensor([2e38, -3e38, 1e30, -1e38, 1e38, 1e36])
    loc = torch.tensor([0.0, 0.0, 0.0, 3e38, 3e38, 0.0])[:, None]
    log_scale = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0])[:, None]
    x, lad = fastflow.mixture_cdf_inverse(t.to(DEVICE), torch.zeros_like(loc).to(DEVICE),
                                          loc.to(DEVICE), log_scale.to(DEVICE),
                                          kind="logistic", output="logit")
    x, lad = x.cpu(), lad.cpu()
    assert x[:4].tolist() == pytest.approx([2e38, -3e38, 1e30, 2e38], rel=1e-6)
    assert x[4:].tolist() == [float("inf")] * 2
    # logabsdet 0 where the map is the identity (within a compiled kernel's approximations)
    assert lad[:4].tolist() == pytest.approx([0.0] * 4, abs=1e-5)
    assert lad[4:].tolist() == [float("inf")] * 2


@pytest.mark.parametrize("log_scale", [88.0, 89.0, 95.0, 103.0])
@pytest.mark.parametrize("kind", KINDS)
def test_inverse_of_one_overflowing_scale_keeps_the_side(backend, kind, log_scale):
    """One component whose scale is near or past float32's largest value: the root
    loc + s q(z) of z = 0.999, 0.7 and 0.3 (q the component's quantile), that root in float32
    where it and s are finite and +-inf on its own side where either is not (the kernels gave
    -inf for each root past float32's range: a bracket end at +inf was kept as the lower
    end)."""
    z = torch.tensor([0.999, 0.7, 0.3])
    zero = torch.zeros(3, 1)
    x, lad = fastflow.mixture_cdf_inverse(z.to(DEVICE), zero.to(DEVICE), zero.to(DEVICE),
                                          torch.full((3, 1), log_scale).to(DEVICE), kind=kind)
    x, lad = x.cpu(), lad.cpu()
    z64 = z.double()
    q = torch.logit(z64) if kind == "logistic" else math.sqrt(2) * torch.erfinv(2 * z64 - 1)
    root = (math.exp(log_scale) * q).float()
    if math.exp(log_scale) > torch.finfo(torch.float32).max:  # s itself is past the range
        root = torch.sign(root) * math.inf
    assert (root.isinf() == x.isinf()).all() and (x[x.isinf()] == root[root.isinf()]).all()
    torch.testing.assert_close(x[~x.isinf()], root[~root.isinf()], rtol=1e-5, atol=0)
    assert (lad[x.isinf()] == float("inf")).all() and torch.isfinite(lad[~x.isinf()]).all()


@pytest.mark.parametrize("output", OUTPUTS)
def test_inverse_at_a_location_whose_inverse_scale_overflows(backend, output):
    """A logistic of log_scale -100 (1/s past float32's range) at its own location: target
    logit 0 (z = 1/2) has the root x = loc, and logabsdet minus the forward's there, -100
    (logit) or -(100 - log 4) (unit); beside a second component of scale 1 the roots of
    z = 0.3 and 0.999 have finite logabsdets too, minus the forward's at the returned roots.
    Regression: the kernels' probability-space sums were 0 * inf = NaN there and the
    logabsdet NaN."""
    y = torch.tensor([0.0 if output == "logit" else 0.5])
    x, lad = fastflow.mixture_cdf_inverse(y.to(DEVICE), torch.zeros(1, 1).to(DEVICE),
                                          torch.zeros(1, 1).to(DEVICE),
                                          torch.full((1, 1), -100.0).to(DEVICE), kind="logistic",
                                          output=output)
    assert x.cpu().tolist() == [0.0]
    expected = -100.0 if output == "logit" else -(100.0 - math.log(4.0))
    assert lad.cpu().tolist() == pytest.approx([expected], rel=1e-6)
    z = torch.tensor([0.3, 0.999])
    params = [torch.tensor([[0.0, 0.0]] * 2), torch.tensor([[0.0, 1.0]] * 2),
              torch.tensor([[-100.0, 0.0]] * 2)]
    x, lad = fastflow.mixture_cdf_inverse(z.to(DEVICE), *(p.to(DEVICE) for p in params),
                                          kind="logistic")
    x, lad = x.cpu(), lad.cpu()
    assert torch.isfinite(lad).all(), lad
    _, fwd_lad = fastflow.mixture_cdf(x.to(DEVICE), *(p.to(DEVICE) for p in params),
                                      kind="logistic")
    torch.testing.assert_close(lad, -fwd_lad.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_inverse_where_a_scale_overflows(backend, kind, output, dtype):
    """A dominant component whose scale exp(log_scale) is past the dtype's range (a network
    far outside its data gave it log_scale 822.5) makes logit F flat at 0 over every finite
    x: target 0 is met anywhere (x must be forward-exact), any other target only at +-inf
    (logabsdet +inf). Regression: the bracket was inf * 0 = NaN and x, logabsdet NaN. With
    every scale overflowing the map is flat everywhere; with one past float32's range only
    (log_scale 92) float32 finds the root within its range (t = 1e-3: about 1e37) and
    returns -inf for the one past it (t = -5: about -3e40)."""
    rows = [
        ([7.9, 652.9], [589.85, 513.84], [429.8, 822.5]),
        ([0.3, -0.2], [1.0, -2.0], [800.0, 900.0]),
        ([7.9, 652.9], [589.85, 513.84], [-3.0, 92.0]),
    ]
    t = torch.tensor([0.0, 1e-3, -5.0], dtype=torch.float64)
    y = t if output == "logit" else torch.sigmoid(t)
    for logits, loc, log_scale in rows:
        params = [torch.tensor([v] * 3, dtype=torch.float64) for v in (logits, loc, log_scale)]
        x, lad = fastflow.mixture_cdf_inverse(
            y.to(dtype).to(DEVICE), *(p.to(dtype).to(DEVICE) for p in params), kind=kind,
            output=output)
        x, lad = x.cpu().double(), lad.cpu().double()
        assert not (x.isnan().any() or lad.isnan().any()), (log_scale, x, lad)
        finite = torch.isfinite(x)
        if log_scale[1] < 100.0 and dtype == torch.float64:
            assert finite.all()
        elif log_scale[1] < 100.0:
            assert finite.tolist() == [True, True, False]
        else:
            assert finite.tolist() == [True, False, False]
            assert x[1] == float("inf") and x[2] == -float("inf")
        assert (lad[~finite] == float("inf")).all() and torch.isfinite(lad[finite]).all()
        # Each finite root is forward-exact, in float64, to float32's rounding of t.
        g, g_lad = fastflow.reference.mixture_cdf_fwd(
            x[finite], *(p[finite] for p in params), kind, "logit")
        torch.testing.assert_close(g, t[finite], rtol=0, atol=2e-6)
        torch.testing.assert_close(lad[finite], -g_lad - (0 if output == "logit" else
                                   (torch.log(y * (1 - y)))[finite]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["logits", "loc", "log_scale"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_nan_parameters_give_nan_with_validation_off(backend, which, output):
    """With validation off nothing refuses NaN parameters: the element's x and logabsdet
    are NaN, as the forward's are, and the other elements are untouched. Before, the solve
    returned a plausible number (x = t for NaN logits, 1.7e38 for a NaN loc or scale)."""
    K = 2
    names = ["logits", "loc", "log_scale"]
    params = {n: torch.zeros(3, K) for n in names}
    params["loc"][:, 1] = 1.0
    params[which][1, 1] = math.nan
    y = torch.tensor([0.3, 0.3, 0.6])
    previous = fastflow.get_validate_args()
    fastflow.set_validate_args(False)
    try:
        x, lad = fastflow.mixture_cdf_inverse(
            y.to(DEVICE), *(params[n].to(DEVICE) for n in names), output=output)
        clean = {n: p[[0, 2]] for n, p in params.items()}
        x_ok, lad_ok = fastflow.mixture_cdf_inverse(
            y[[0, 2]].to(DEVICE), *(clean[n].to(DEVICE) for n in names), output=output)
    finally:
        fastflow.set_validate_args(previous)
    x, lad = x.cpu(), lad.cpu()
    assert x[1].isnan() and lad[1].isnan()
    torch.testing.assert_close(x[[0, 2]], x_ok.cpu())
    torch.testing.assert_close(lad[[0, 2]], lad_ok.cpu())
