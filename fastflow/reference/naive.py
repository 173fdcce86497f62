"""The oracle: the mixture CDF's log-space formulas in plain PyTorch, and a fixed-schedule
inverse built on them.

Every kernel and the CPU path (:mod:`fastflow.reference.mixture_cdf`,
:mod:`fastflow.reference.mixture_inverse`) are tested against :func:`forward`, which the
tests in turn hold to autograd Jacobians, finite differences, quadrature and scipy.
Log-sum-exps throughout, 1 - F never formed by subtraction, and the logit output's
log-derivative from the components' responsibilities and hazard rates, so that nothing
cancels in the tails (docs/numerics.md). Differentiable to any order by autograd: the
ops' double backward runs through it.

Inputs are validated and broadcast: ``x`` of shape ``S``, parameters ``S + (K,)``, one
floating dtype (:func:`upcast` computes half precision in float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
HALF_LOG_HALF_PI = 0.5 * math.log(0.5 * math.pi)
INV_SQRT2 = 1.0 / math.sqrt(2.0)

# Abramowitz & Stegun 26.2.23: the upper-tail normal quantile to |error| < 4.5e-4.
_AS_NUM = (2.515517, 0.802853, 0.010328)
_AS_DEN = (1.432788, 0.189269, 0.001308)
# Bracket padding, in units of a component's scale, covering that approximation's error.
GAUSS_BRACKET_PAD = 1e-3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_ndtr(u: torch.Tensor) -> torch.Tensor:
    """log Phi(u), differentiable to any order in both tails. Below u = -1 it is
    log(erfcx(-u/sqrt 2) / 2) - u^2/2 (the form torch's own log_ndtr evaluates there), whose
    autograd stays exact: torch's derivative of log_ndtr is not, far out in the lower tail
    (float32: 955 for 1000 at u = -1000, 0.399 from u = -4e4; float64: inf past u = -3e9),
    and a NaN second derivative followed where it met a zero responsibility."""
    lower = u.clamp(max=-1.0)
    tail = torch.log(0.5 * torch.special.erfcx(-lower * INV_SQRT2)) - 0.5 * lower * lower
    return torch.where(u < -1.0, tail, torch.special.log_ndtr(u.clamp(min=-1.0)))


def _gauss_log_hazard(u: torch.Tensor) -> torch.Tensor:
    """log(phi(u) / Phi(-u)), stable for all u (no cancellation for u >> 0)."""
    u_pos = u.clamp(min=0.0)
    pos = -torch.log(torch.special.erfcx(u_pos * INV_SQRT2)) - HALF_LOG_HALF_PI
    u_neg = u.clamp(max=0.0)
    neg = -0.5 * u_neg * u_neg - HALF_LOG_2PI - torch.special.log_ndtr(-u_neg)  # -u_neg >= 0
    return torch.where(u >= 0, pos, neg)


def log_cdf_sf(u: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log C(u) and log(1 - C(u)) of the standard component."""
    if kind == "logistic":
        # softplus's default threshold (20) returns x itself above it, an error of e^-20
        # (2e-9) that float64 sees; at 40 the error is below float64's resolution.
        return -F.softplus(-u, threshold=40.0), -F.softplus(u, threshold=40.0)
    return log_ndtr(u), log_ndtr(-u)


def component_terms(u: torch.Tensor, kind: str):
    """(log C, log(1-C), log c, log c/(1-C), log c/C) of the standard component at u."""
    log_cdf, log_sf = log_cdf_sf(u, kind)
    if kind == "logistic":
        # c = C (1 - C): the hazard c/(1-C) is C and the reverse hazard c/C is 1-C.
        return log_cdf, log_sf, log_cdf + log_sf, log_cdf, log_sf
    log_pdf = -0.5 * u * u - HALF_LOG_2PI
    return log_cdf, log_sf, log_pdf, _gauss_log_hazard(u), _gauss_log_hazard(-u)


def standardize(x, logits, loc, log_scale):
    """log pi and u = (x - loc) / s of the log-space formulas.

    Where 1/s = exp(-log_scale) overflows (log_scale below about -88.7 in float32, -709.8
    in float64) u is +-inf, and at x == loc the product is 0 * inf: u is exactly 0 there.
    Only that case is replaced, so autograd sees (x - loc) / s everywhere else.
    """
    log_pi = torch.log_softmax(logits, dim=-1)
    d = x.unsqueeze(-1) - loc
    inv_s = torch.exp(-log_scale)
    u = torch.where((d == 0) & torch.isinf(inv_s), 0.0, d * inv_s)
    return log_pi, u


def upcast(*tensors):
    dtype = compute_dtype(tensors[0].dtype)
    return [t.to(dtype) for t in tensors]


def forward(x, logits, loc, log_scale, kind: str, output: str):
    """The forward map in the compute dtype; autograd flows through it."""
    log_pi, u = standardize(x, logits, loc, log_scale)
    log_cdf, log_sf, log_pdf, log_h_sf, log_h_cdf = component_terms(u, kind)
    log_f = torch.logsumexp(log_pi + log_pdf - log_scale, dim=-1)
    if output == "density":
        return None, log_f
    v_cdf = log_pi + log_cdf
    v_sf = log_pi + log_sf
    log_F = torch.logsumexp(v_cdf, dim=-1)
    log_S = torch.logsumexp(v_sf, dim=-1)
    if output == "unit":
        # F from whichever of F, 1-F is below one half, so that the value and its gradient
        # (dF = -(1-F) dlog(1-F)) stay exact in the upper tail.
        z = torch.where(log_F < -LOG_2, torch.exp(log_F), -torch.expm1(log_S))
        return z, log_f
    y = log_F - log_S
    # log(f / (1-F)) = logsumexp_k(resp_k(1-F) + log hazard_k - log s_k), and symmetrically.
    log_f_over_S = torch.logsumexp(_resp_hazard(v_sf, log_h_sf) - log_scale, dim=-1)
    log_f_over_F = torch.logsumexp(_resp_hazard(v_cdf, log_h_cdf) - log_scale, dim=-1)
    lad = torch.where(y > 0, log_f_over_S - log_F, log_f_over_F - log_S)
    return y, _saturated_logit_lad(lad, y, x, log_pi, loc, log_scale, kind)


def _resp_hazard(v, log_h):
    """log responsibility + log hazard of each component (v: log pi C or log pi (1 - C)).

    A component without responsibility adds nothing, also where its hazard is infinite (a
    Gaussian component at u = +-inf: -inf + inf): their product is pi c / s over the sum,
    and c is 0 there.
    """
    resp = torch.log_softmax(v, dim=-1)
    return torch.where(resp == -math.inf, -math.inf, resp + log_h)


def _saturated_logit_lad(lad, y, x, log_pi, loc, log_scale, kind: str):
    """The logit output's logabsdet where 1 - F (y = +inf) or F (y = -inf) is 0 at finite x.

    There every component with pi > 0 lies beyond float range on one side of x (1/s or u^2
    overflows), the responsibilities are 0 / 0 and the hazard form is NaN. The exact value
    is finite: the tail sum is dominated by the component with the smallest |u_k|,
    k* = argmin_k log|x - loc_k| - log s_k (taken without forming u), and f / (1 - F) tends
    to its hazard over its scale: lad = -log s_k* for the logistic (hazard -> 1) and
    log|x - loc_k*| - 2 log s_k* for the Gaussian (hazard -> |u|). Exact ties in log|u_k|
    take the smallest candidate. Written without data-dependent control flow (the fixed
    inverse schedule's steps compile as one graph); elsewhere the inputs to the logarithm are
    masked to 1 so that the unselected branch stays finite under autograd.
    """
    sat = torch.isinf(y) & torch.isfinite(x)
    d = torch.where(sat.unsqueeze(-1), x.unsqueeze(-1) - loc, 1.0)
    log_u = torch.where(log_pi == -math.inf, math.inf, torch.log(d.abs()) - log_scale)
    lim = -log_scale if kind == "logistic" else log_u - log_scale
    nearest = log_u == log_u.amin(-1, keepdim=True)
    lim = torch.where(nearest, lim, math.inf).amin(-1)
    return torch.where(sat, lim, lad)


def logit_forward(x, log_pi, loc, inv_scale, kind):
    """logit F(x) only: the quantity bisection compares against the target."""
    log_cdf, log_sf = log_cdf_sf((x.unsqueeze(-1) - loc) * inv_scale, kind)
    return torch.logsumexp(log_pi + log_cdf, -1) - torch.logsumexp(log_pi + log_sf, -1)


def target_logit(y: torch.Tensor, output: str) -> torch.Tensor:
    """The target in logit space: y itself, or log z - log(1 - z) for unit targets."""
    if output == "logit":
        return y
    return torch.log(y) - torch.log1p(-y)


def component_quantile(t: torch.Tensor, kind: str) -> torch.Tensor:
    """u with logit C(u) = t for the standard component (Gaussian: to about 4.5e-4)."""
    if kind == "logistic":
        return t
    w = torch.sqrt(2.0 * F.softplus(t.abs()))
    num = _AS_NUM[0] + w * (_AS_NUM[1] + w * _AS_NUM[2])
    den = 1.0 + w * (_AS_DEN[0] + w * (_AS_DEN[1] + w * _AS_DEN[2]))
    return torch.sign(t) * (w - num / den)


def bracket(z, scale, kind, dim):
    """(lo, hi, wide): [lo, hi] holding the root for a logit target t, from the components'
    own inverses z = loc + scale component_quantile(t) along ``dim`` (padded by
    GAUSS_BRACKET_PAD scales for the Gaussian quantile's approximation error). ``wide`` marks
    the elements where some end is not finite (a scale, or scale times the quantile, past the
    dtype's range): their bracket is the whole finite range, which :func:`solve_bisect`
    searches."""
    if kind == "gaussian":
        lo_k = torch.add(z, scale, alpha=-GAUSS_BRACKET_PAD)
        hi_k = torch.add(z, scale, alpha=GAUSS_BRACKET_PAD)
    else:
        lo_k = hi_k = z
    # An end that is inf, or NaN (inf * 0: an infinite scale at the quantile 0, which allows
    # any x; amin and amax propagate NaN), marks the element wide: (lo - lo) + (hi - hi) is 0
    # exactly where both ends are finite, NaN elsewhere (four cheap ops where two isfinite
    # calls cost several times that, which the CPU sampler's per-step solve feels).
    lo, hi = lo_k.amin(dim), hi_k.amax(dim)
    wide = (lo - lo).add_(hi - hi) != 0
    return lo, hi, wide


def _float_key(x: torch.Tensor) -> torch.Tensor:
    """An integer that orders as x does (its magnitude's bits, negated for negative x)."""
    bits = x.abs().view(torch.int64 if x.dtype == torch.float64 else torch.int32)
    return torch.where(x < 0, -bits, bits)


def _key_float(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float whose :func:`_float_key` is k."""
    value = k.abs().view(dtype)
    return torch.where(k < 0, -value, value)


def solve_bisect(t, logits, loc, log_scale, kind):
    """Roots of logit F(x) = t (flat finite targets (N,), parameters (N, K)) by bisection
    over the floats of the parameters' bracket in their integer order, which halves the count
    of floats in the bracket each step, so that one step per bit of the dtype leaves adjacent
    floats however wide the bracket is against the components' scales (linear bisection of
    [-1e19, 1e19] needs some 130 halvings to find a root near 1e-13). The end whose residual
    is smaller is returned (forward-exact to the dtype). A bracket past the dtype's range
    (``wide``) is [-M/2, M/2], M the largest finite float (x - loc then stays finite), and x
    is +-inf where F there is still short of the target (or past it at minus that)."""
    big = 0.5 * torch.finfo(t.dtype).max
    log_pi = torch.log_softmax(logits, dim=-1)
    inv_scale = torch.exp(-log_scale)
    scale = torch.exp(log_scale)
    lo, hi, wide = bracket(loc + scale * component_quantile(t, kind).unsqueeze(-1), scale,
                          kind, -1)
    lo = torch.where(wide, -big, lo)
    hi = torch.where(wide, big, hi)
    h_lo = logit_forward(lo, log_pi, loc, inv_scale, kind) - t
    h_hi = logit_forward(hi, log_pi, loc, inv_scale, kind) - t
    bits = 64 if t.dtype == torch.float64 else 32
    for _ in range(bits):
        k_lo, k_hi = _float_key(lo), _float_key(hi)
        mid = _key_float((k_lo >> 1) + (k_hi >> 1) + (k_lo & k_hi & 1), t.dtype)
        h = logit_forward(mid, log_pi, loc, inv_scale, kind) - t
        # An exact root closes the bracket on itself (on a flat map, the first one found).
        below, above = h <= 0, h >= 0
        lo, hi = torch.where(below, mid, lo), torch.where(above, mid, hi)
        h_lo, h_hi = torch.where(below, h, h_lo), torch.where(above, h, h_hi)
    x = torch.where(h_lo.abs() <= h_hi.abs(), lo, hi)
    # Past a wide bracket's ends (+-big) the root is past the dtype's range; past a parameter
    # end (the residual there rounded across zero) that end is the nearest float.
    x = torch.where((h_hi < 0) & wide, math.inf, x)
    return torch.where((h_lo > 0) & wide, -math.inf, x)


def finish_inverse(x, t, lad, dtype):
    """The inverse's logabsdet from the forward's at x, and the boundary (+-inf) and NaN
    targets. An infinite x (a boundary target, or a root past the dtype's range) has
    logabsdet +inf."""
    lad = -lad
    x = torch.where(torch.isinf(t), t, x)
    lad = torch.where(torch.isinf(x), torch.full_like(lad, math.inf), lad)
    nan = torch.isnan(t)
    x = torch.where(nan, t, x)
    lad = torch.where(nan, t, lad)
    return x.to(dtype), lad.to(dtype)


def solve_fixed(t, logits, loc, log_scale, kind, bisect_steps, newton_steps):
    """Root of logit F(x) = t in log space: bisection, then safeguarded Newton steps, each
    inside the bracket. Where an end of the final bracket has a residual at the rounding level
    of logit F, that end instead (the one with the smaller residual): a flat stretch of the
    map can put a sign change of the rounded residual an ulp from a steep rise, and the point
    inside such a bracket need not be near the root, while that end is forward-exact."""
    log_pi = torch.log_softmax(logits, dim=-1)
    inv_scale = torch.exp(-log_scale)
    scale = torch.exp(log_scale)
    lo, hi, wide = bracket(loc + scale * component_quantile(t, kind).unsqueeze(-1), scale,
                            kind, -1)
    lo, hi = lo.masked_fill(wide, 0.0), hi.masked_fill(wide, 0.0)
    # The residuals at the bracket's ends (inf: not evaluated).
    h_lo = torch.full_like(lo, math.inf)
    h_hi = h_lo.clone()

    def narrow(x, h, lo, hi, h_lo, h_hi):
        below = h < 0
        return (torch.where(below, x, lo), torch.where(below, hi, x),
                torch.where(below, h, h_lo), torch.where(below, h_hi, h))

    for _ in range(bisect_steps):
        mid = 0.5 * lo + 0.5 * hi
        h = logit_forward(mid, log_pi, loc, inv_scale, kind) - t
        lo, hi, h_lo, h_hi = narrow(mid, h, lo, hi, h_lo, h_hi)
    x = 0.5 * lo + 0.5 * hi
    for _ in range(newton_steps):
        g, lad = forward(x, logits, loc, log_scale, kind, "logit")
        lo, hi, h_lo, h_hi = narrow(x, g - t, lo, hi, h_lo, h_hi)
        x_new = x - (g - t) * torch.exp(-lad)
        inside = (x_new > lo) & (x_new < hi)
        x = torch.where(inside, x_new, 0.5 * lo + 0.5 * hi)
    tol_h = 16.0 * torch.finfo(t.dtype).eps * t.abs().clamp(min=1.0)
    end = torch.where(h_lo.abs() <= h_hi.abs(), lo, hi)
    x = torch.where(torch.minimum(h_lo.abs(), h_hi.abs()) <= tol_h, end, x)
    wide &= torch.isfinite(t)
    if bool(wide.any()):
        x[wide] = solve_bisect(t[wide], logits[wide], loc[wide], log_scale[wide], kind)
    return x


def inverse_fixed(
    y, logits, loc, log_scale, kind: str, output: str, bisect_steps: int, newton_steps: int
):
    """A fixed schedule in log space: bisection steps in logit space, then safeguarded
    Newton steps (the kernels' earlier algorithm; now a benchmark baseline). One
    data-dependent branch: elements whose bracket is past the dtype's range go to
    :func:`solve_bisect` (a host sync, and under torch.compile a graph break between the
    schedule and that branch)."""
    with torch.no_grad():
        y_c, logits_c, loc_c, log_scale_c = upcast(y, logits, loc, log_scale)
        t = target_logit(y_c, output)
        x = solve_fixed(t, logits_c, loc_c, log_scale_c, kind, bisect_steps, newton_steps)
        _, lad = forward(x, logits_c, loc_c, log_scale_c, kind, output)
        return finish_inverse(x, t, lad, y.dtype)
