"""The mixture-CDF inverse's device solve, shared by the inverse kernel
(:mod:`.mixture_inverse`) and the one-pass sampler (:mod:`.autoregressive`): ``solve`` finds
x with logit F(x) = t for a tile of targets and mixtures by safeguarded Halley iteration on
logit F in a bracket of the components' own inverses (the algorithm: :mod:`.mixture_inverse`
and docs/numerics.md), and ``target_logit`` maps a target to logit space.
"""

import triton
import triton.language as tl

from ._math import fast_exp, fast_rcp, log1p, softplus, sum_log, weighted_lse_parts
from .device import component_parts, f_floor, forward_eval, hazards, logistic_sums


@triton.jit
def _component_quantile(t, KIND: tl.constexpr):
    """u with logit C(u) = t: exact for the logistic, A&S 26.2.23 for the Gaussian."""
    if KIND == 0:
        u = t
    else:
        w = tl.sqrt(2.0 * softplus(tl.abs(t)))
        num = 2.515517 + w * (0.802853 + w * 0.010328)
        den = 1.0 + w * (1.432788 + w * (0.189269 + w * 0.001308))
        mag = w - num / den
        u = tl.where(t < 0.0, -mag, mag)
    return u


@triton.jit
def _key_mid(lo, hi):
    """The midpoint of [lo, hi] in the floats' integer order (the float whose key, its
    magnitude's bits negated for negative values, is the keys' mean): one bisection step per
    bit of the dtype leaves adjacent floats, however wide the bracket."""
    if lo.dtype == tl.float64:
        a = tl.abs(lo).to(tl.int64, bitcast=True)
        b = tl.abs(hi).to(tl.int64, bitcast=True)
    else:
        a = tl.abs(lo).to(tl.int32, bitcast=True)
        b = tl.abs(hi).to(tl.int32, bitcast=True)
    a = tl.where(lo < 0.0, -a, a)
    b = tl.where(hi < 0.0, -b, b)
    k = (a >> 1) + (b >> 1) + (a & b & 1)
    mag = tl.abs(k).to(lo.dtype, bitcast=True)
    return tl.where(k < 0, -mag, mag)


@triton.jit
def _logit_slope_eval(x, log_pi, loc, log_scale, KIND: tl.constexpr, FAST: tl.constexpr):
    """logit F(x), the log of its slope g' = f / (F (1 - F)) and g''/g', for Halley's step.

    The slope as log f - log F - log(1 - F): in a far tail that difference cancels to an
    absolute error of a few ulps of |logit F|, a relative error of the slope that only slows
    the iteration negligibly (the root itself is set by logit F, exact in log space). Cheaper
    than ``forward_eval``'s hazard-rate form, which the logabsdet at the solution still uses.
    g''/g' = d log g'/dx = f'/f - f/F + f/(1 - F), with f'/f the responsibility-weighted
    d log c/du / s of the components: (1 - C) - C for the logistic, -u for the Gaussian.
    """
    inv_s = tl.exp(-log_scale)
    u = (x[:, None] - loc) * inv_s
    c_part, s_part, d_part, w = component_parts(u, KIND, FAST)
    m_c, s_c = weighted_lse_parts(log_pi + c_part, w, FAST)
    m_s, s_s = weighted_lse_parts(log_pi + s_part, w, FAST)
    log_F = m_c + s_c
    log_S = m_s + s_s
    # log f and f'/f from the same exponentials
    v_f = log_pi + d_part - log_scale
    m_f = tl.max(v_f, axis=1)
    m_f = tl.where(m_f == -float("inf"), 0.0, m_f)
    terms = fast_exp(v_f - m_f[:, None], FAST) * (w * w)
    total = tl.sum(terms, axis=1)
    _, _, dlog_c = hazards(u, w, KIND, FAST)
    df_f = tl.sum(terms * dlog_c * inv_s, axis=1) / total
    log_f = m_f + sum_log(total, FAST)
    curv = df_f - tl.exp(log_f - log_F) + tl.exp(log_f - log_S)
    return log_F - log_S, log_f - log_F - log_S, curv


@triton.jit
def _logistic_prob_eval(x, pi, loc, inv_s, tiny, f_min, FAST: tl.constexpr):
    """A logistic mixture's logit F(x), the inverse slope 1/g' = F (1 - F) / f of g = logit F,
    and g''/g' = f'/f - f/F + f/(1 - F), from :func:`logistic_sums`, with whether a lane
    needs :func:`_logit_slope_eval`'s log space instead: its F or 1 - F is below ``tiny``, its
    f below ``f_min`` (:func:`f_floor`: far enough down that a term which underflowed could
    matter), or a sum is not finite. One logarithm per element instead of the log space's
    logsumexps; also returns f.
    """
    big_f, big_s, f, df = logistic_sums(x, pi, loc, inv_s, FAST)
    # Each test fails on NaN: x at a component's location whose 1/s overflowed (0 * inf), or
    # an infinite f, also takes log space.
    need = ~((big_f >= tiny) & (big_s >= tiny) & (f >= f_min) & (f < float("inf")))
    big_f = tl.where(need, 1.0, big_f)
    big_s = tl.where(need, 1.0, big_s)
    f = tl.where(need, 1.0, f)
    r_f = fast_rcp(f, FAST)
    r_s = fast_rcp(big_s, FAST)
    g = tl.log(big_f * r_s)
    inv_slope = big_f * big_s * r_f
    curv = df * r_f - f * fast_rcp(big_f, FAST) + f * r_s
    return g, inv_slope, curv, need, f


@triton.jit
def target_logit(y, OUTPUT: tl.constexpr):
    """The target in logit space: y itself, or log z - log(1 - z) for unit targets."""
    if OUTPUT == 1:
        t = y
    else:
        t = tl.log(y) - log1p(-y)
    return t


@triton.jit
def solve(t, log_pi, loc, log_scale, mask, row_mask, KIND: tl.constexpr, OUTPUT: tl.constexpr,
           MAX_STEPS: tl.constexpr, FAST: tl.constexpr):
    """(x, lad, steps) with logit F(x) = t for a [BLOCK_N] target and [BLOCK_N, BLOCK_K]
    mixtures (lad = log|dx/dy| for the output kind; steps = the loop iterations the tile ran);
    shared by the inverse and autoregressive kernels. Rows off ``row_mask`` are not solved.

    Safeguarded Halley (rtsafe with a curvature-corrected step) on logit F, evaluated in log
    space: each iteration narrows the bracket with the sign of F(x) - t and takes the Halley
    step (Newton's where the correction factor is out of [1/2, 2]) when it stays inside the
    bracket and at least halves the step before last, else bisects. A lane stops once its
    Newton step is below cbrt(eps)/4 of its smallest component scale where the Halley step was
    taken (its error is then of order the step cubed) or sqrt(eps)/4 where Newton's was, its
    step is a few ulps of x from a residual at the rounding level, or its bracket is a few
    ulps wide; any other step of a few ulps goes 2 eps (|x| + s_min) further, so that the next
    evaluation closes the bracket if the root is that near. The tile stops when every lane
    has; lanes still active after MAX_STEPS iterations bisect in the floats' integer order,
    at most one more iteration per bit of the dtype.
    """
    scale = tl.exp(log_scale)
    if KIND == 0:
        pad = 0.0
    else:
        # Bracket padding for the Gaussian quantile approximation (error < 4.5e-4), in
        # scale units (a literal: compiled Triton refuses module-level floats).
        pad = 1e-3
    if t.dtype == tl.float64:
        bits = 64
        eps = 2.220446049250313e-16
        sqrt_eps = 1.4901161193847656e-08
        cbrt_eps = 6.055454452393343e-06
        tiny = 1e-280
        big = 8.988465674311579e+307  # half the largest float64
    else:
        bits = 32
        eps = 1.1920928955078125e-07
        sqrt_eps = 0.00034526698300124393
        cbrt_eps = 0.004921566601151848
        tiny = 1e-30
        big = 1.7014117331926443e+38  # half the largest float32
    # Boundary (+-inf) and NaN targets, and rows off the mask, are done before the first step;
    # so are NaN parameters (no check refuses them with validation off), whose x is NaN.
    nan_par = tl.max(tl.where(mask & ((log_pi != log_pi) | (loc != loc)
                                      | (log_scale != log_scale)), 1, 0), axis=1) > 0
    active = row_mask & (tl.abs(t) < float("inf")) & ~nan_par
    t_s = tl.where(active, t, 0.0)
    u_t = _component_quantile(t_s, KIND)[:, None]
    # The components' ends; an infinite scale at the quantile 0 (inf * 0 = NaN) allows any x.
    lo_k = loc + scale * (u_t - pad)
    hi_k = loc + scale * (u_t + pad)
    lo_k = tl.where(lo_k == lo_k, lo_k, -float("inf"))
    hi_k = tl.where(hi_k == hi_k, hi_k, float("inf"))
    lo = tl.min(tl.where(mask, lo_k, float("inf")), axis=1)
    hi = tl.max(tl.where(mask, hi_k, -float("inf")), axis=1)
    # A bracket past the dtype's range (an end not finite: a scale, or scale times the
    # quantile, overflowed): the search spans [-big, big] (x - loc stays finite), bisecting in
    # the floats' integer order; a root past it is +-inf. Finite ends, even past big, stay.
    wide = active & ((lo - lo) + (hi - hi) != 0.0)
    lo = tl.where(active, tl.where(wide, -big, lo), 0.0)
    hi = tl.where(active, tl.where(wide, big, hi), 0.0)
    s_min = tl.min(tl.where(mask, scale, float("inf")), axis=1)
    s_min = tl.where(active, tl.minimum(s_min, big), 1.0)
    # A Halley step of size d leaves an error of order d^3 / s^2, a Newton step d^2 / s.
    tol_halley = 0.25 * cbrt_eps * s_min
    tol_newton = 0.25 * sqrt_eps * s_min
    # The rounding level of logit F's evaluation (a few ulps of max(1, |t|)).
    tol_h = 16.0 * eps * tl.maximum(tl.abs(t_s), 1.0)
    # Start from the pi-weighted mean of the components' inverses, clamped into the bracket.
    pi = tl.where(mask, fast_exp(log_pi, FAST), 0.0)
    pi_sum = tl.sum(pi, axis=1)
    x = tl.sum(pi * (loc + scale * u_t), axis=1) / tl.where(pi_sum > 0.0, pi_sum, 1.0)
    x = tl.minimum(tl.maximum(x, lo), hi)
    x = tl.where(active, x, 0.0)
    dx_old = hi - lo
    dx = dx_old
    # The residuals at the bracket's ends (inf: not evaluated).
    h_lo = x * 0.0 + float("inf")
    h_hi = h_lo
    beyond = x * 0.0
    if tl.max(tl.where(wide, 1, 0), axis=0) > 0:
        g_lo, _, _ = _logit_slope_eval(lo, log_pi, loc, log_scale, KIND, FAST)
        g_hi, _, _ = _logit_slope_eval(hi, log_pi, loc, log_scale, KIND, FAST)
        h_lo = tl.where(wide, g_lo - t_s, h_lo)
        h_hi = tl.where(wide, g_hi - t_s, h_hi)
        beyond = tl.where(wide & (h_hi < 0.0), float("inf"), beyond)
        beyond = tl.where(wide & (h_lo > 0.0), -float("inf"), beyond)
        active = active & (beyond == 0.0)
        wide = wide & active
        x = tl.where(wide, _key_mid(lo, hi), x)
        dx_old = tl.where(wide, float("inf"), dx_old)
        dx = dx_old
    if KIND == 0:
        # Loop invariants of the probability-space evaluation.
        inv_s = tl.exp(-log_scale)
        f_min = f_floor(tiny, inv_s)
    steps = tl.max(tl.where(active, 1, 0), axis=0) * 0
    pending = tl.max(tl.where(active, 1, 0), axis=0)
    while pending > 0:
        if KIND == 0:
            # Probability space, unless some lane's sums are too small for it: then log space
            # for the tile, taken by those lanes.
            g, inv_slope, curv, need, _ = _logistic_prob_eval(x, pi, loc, inv_s, tiny, f_min,
                                                              FAST)
            need = active & need
            if tl.max(tl.where(need, 1, 0), axis=0) > 0:
                g_log, g_lad, curv_log = _logit_slope_eval(x, log_pi, loc, log_scale, KIND,
                                                           FAST)
                g = tl.where(need, g_log, g)
                inv_slope = tl.where(need, tl.exp(-g_lad), inv_slope)
                curv = tl.where(need, curv_log, curv)
        else:
            g, g_lad, curv = _logit_slope_eval(x, log_pi, loc, log_scale, KIND, FAST)
            inv_slope = tl.exp(-g_lad)
        h = g - t_s
        below = h < 0.0
        lo = tl.where(active & below, x, lo)
        hi = tl.where(active & (h > 0.0), x, hi)
        h_lo = tl.where(active & below, h, h_lo)
        h_hi = tl.where(active & (h > 0.0), h, h_hi)
        # Halley's step: Newton's, divided by 1 + (Newton's) g''/(2 g'); Newton's where that
        # factor is outside [1/2, 2] (the safeguards below still apply). Convergence is
        # judged by Newton's step, the first-order distance to the root, whichever is taken.
        step_n = -h * inv_slope
        denom = 1.0 + 0.5 * step_n * curv
        halley = (denom >= 0.5) & (denom <= 2.0)
        newton = x + tl.where(halley, step_n / denom, step_n)
        inside = (newton >= lo) & (newton <= hi)
        # Past MAX_STEPS the lanes still active (a bracket orders of magnitude wider than the
        # smallest scale, which halving does not resolve in time) bisect in the floats'
        # integer order only: one step per bit of the dtype leaves adjacent floats.
        forced = steps >= MAX_STEPS
        use_newton = inside & (2.0 * tl.abs(newton - x) <= tl.abs(dx_old)) & ~forced
        # Converged: an exact root; Newton's step within tol_halley or tol_newton (x is
        # smooth on that scale); a step within a few ulps (`ulps`) from a residual at the
        # rounding level (x stays: forward-exact, and within the step of the root where the
        # map is smooth); or the bracket
        # within two `ulps`. There x moves to the step's end inside the bracket, or, where
        # an end's residual is at the rounding level, to the end with the smaller residual:
        # in float32 a flat stretch of the map can put a sign change of the rounded residual
        # a few ulps from a steep rise that the bracket also spans, so such a bracket need
        # not hold the root, while that end is forward-exact. A step of a few ulps alone
        # proves nothing: on the steep edge of a plateau (a narrow component's tail below
        # the light components' mass) it can be a few ulps while the root lies far beyond.
        ulps = 4.0 * eps * (tl.abs(x) + s_min)
        short = use_newton & (tl.abs(newton - x) <= ulps)
        smooth = use_newton & (tl.abs(step_n) <= tl.where(halley, tol_halley, tol_newton))
        # A short step from a residual at the rounding level: x itself stays (the step could
        # cross the steep rise of a narrow component beside a plateau at the target's level).
        stays = short & (tl.abs(h) <= tol_h) & ~smooth
        converged = smooth | stays
        closed = hi - lo <= 2.0 * ulps
        done = converged | closed | (h == 0.0)
        h_far = tl.abs(tl.where(below, h_hi, h_lo))
        x_end = tl.where(tl.abs(h) <= h_far, x, tl.where(below, hi, lo))
        x_end = tl.where(inside & (tl.minimum(tl.abs(h), h_far) > tol_h), newton, x_end)
        # Any other step of a few ulps goes half an `ulps` further, so that if the root lies
        # within it the next evaluation lands beyond the root and the bracket closes.
        over = short & ~done
        newton = tl.where(over, newton + tl.where(newton > x, 0.5, -0.5) * ulps, newton)
        x_next = tl.where(use_newton, newton,
                          tl.where(wide | forced, _key_mid(lo, hi), 0.5 * lo + 0.5 * hi))
        x_next = tl.where(closed & ~converged, x_end, x_next)
        step = tl.abs(x_next - x)
        x = tl.where(active & (h != 0.0) & ~stays, x_next, x)
        dx_old = tl.where(active, dx, dx_old)
        dx = tl.where(active, step, dx)
        active = active & ~done
        steps += 1
        pending = tl.max(tl.where(active, 1, 0), axis=0)
        pending = tl.where(steps < MAX_STEPS + bits, pending, 0)
    if KIND == 0:
        # lad = -log g'(x) = log(F (1 - F) / f) (logit) or -log f (unit), from probability-
        # space sums without cancellation (each C, 1 - C, c is a product); log space's hazard
        # form (forward_eval) for lanes whose sums are too small for that.
        _, inv_slope, _, need, f = _logistic_prob_eval(x, pi, loc, inv_s, tiny, f_min, FAST)
        if OUTPUT == 1:
            lad = tl.log(inv_slope)
        else:
            lad = -tl.log(f)
        need = row_mask & need
        if tl.max(tl.where(need, 1, 0), axis=0) > 0:
            _, lad_log = forward_eval(x, log_pi, loc, log_scale, KIND, OUTPUT, FAST)
            lad = tl.where(need, -lad_log, lad)
    else:
        _, lad = forward_eval(x, log_pi, loc, log_scale, KIND, OUTPUT, FAST)
        lad = -lad
    # Boundary targets, and roots past the searched range, map to +-inf with logabsdet +inf;
    # NaN targets stay NaN.
    x = tl.where(beyond != 0.0, beyond, x)
    x = tl.where(tl.abs(t) == float("inf"), t, x)
    lad = tl.where(tl.abs(x) == float("inf"), float("inf"), lad)
    nan = (t != t) | nan_par
    x = tl.where(nan, float("nan"), x)
    lad = tl.where(nan, float("nan"), lad)
    return x, lad, steps
