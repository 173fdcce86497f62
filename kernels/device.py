"""Device functions shared by the mixture-CDF kernels: loading a tile of mixtures, the
forward map and logabsdet in probability and log space, the pieces of its VJP, and a MADE
output head's mixture parameters from its hidden units (``head_params``, for the fused head
and the one-pass solve). The inverse's solve, shared the same way, is in kernels/solve.py.

The forward (kernels/mixture_cdf.py), the inverse (kernels/mixture_inverse.py), the fused
MADE head (kernels/made.py) and the one-pass autoregressive solve (kernels/autoregressive.py)
all evaluate the mixture through these, so that one formula serves every kernel.

Layout. A tile is [BLOCK_N, BLOCK_K]: BLOCK_N elements, each with its K components
(BLOCK_K = next power of two >= K, masked). Modes: KIND 0 logistic, 1 Gaussian; OUTPUT 0
"unit" (y = F, lad = log f), 1 "logit" (y = logit F, lad = log|dy/dx|), 2 "density".
"""

import triton
import triton.language as tl

from ._math import (
    fast_exp,
    fast_rcp,
    gauss_log_hazard,
    log_ndtr,
    lse_parts,
    sum_log,
    weighted_lse_parts,
)


@triton.jit
def load_rows(ptrs, mask):
    """tl.load of a [BLOCK_N, BLOCK_K] tile through a flat [BLOCK_K * BLOCK_N] view, index
    k * BLOCK_N + n: the load then gives consecutive elements to consecutive threads and each
    thread all of an element's components, so the reductions over K stay in one thread."""
    BN: tl.constexpr = ptrs.shape[0]
    BK: tl.constexpr = ptrs.shape[1]
    flat_p = tl.reshape(tl.trans(ptrs), (BN * BK,))
    flat_m = tl.reshape(tl.trans(mask), (BN * BK,))
    v = tl.load(flat_p, mask=flat_m, other=0.0)
    return tl.trans(tl.reshape(v, (BK, BN)))


@triton.jit
def load_mixture(
    logit_ptr, loc_ptr, log_scale_ptr,
    s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
    offs_n, mask_n, C, K,
    BLOCK_K: tl.constexpr, CDT: tl.constexpr, DENSE: tl.constexpr, FAST: tl.constexpr,
):
    """Load a [BLOCK_N, BLOCK_K] tile of (log pi, loc, log_scale); padded lanes get pi = 0.

    DENSE (1 or 2): every parameter is a contiguous (N, K) array and K == BLOCK_K, so element
    n's components start at n * BLOCK_K. With 1 the compiler knows the rows are aligned and
    loads them as vectors, several components per thread: fewer threads share a row, and the
    per-element work after each reduction is repeated on fewer of them. With 2 the same
    addresses go through :func:`load_rows`, so each thread holds whole rows and nothing per
    row is repeated: for kernels whose per-row work outweighs the wider loads (the inverse's
    iterations).
    """
    offs_k = tl.arange(0, BLOCK_K)
    if DENSE:
        mask_k = offs_k < BLOCK_K  # all true, and known to be: the masks do not split vectors
    else:
        mask_k = offs_k < K
    mask = mask_n[:, None] & mask_k[None, :]
    if DENSE == 1:
        off = offs_n[:, None] * BLOCK_K + offs_k[None, :]
        logit = tl.load(logit_ptr + off, mask=mask, other=0.0).to(CDT)
        loc = tl.load(loc_ptr + off, mask=mask, other=0.0).to(CDT)
        log_scale = tl.load(log_scale_ptr + off, mask=mask, other=0.0).to(CDT)
    elif DENSE == 2:
        off = offs_n[:, None] * BLOCK_K + offs_k[None, :]
        logit = load_rows(logit_ptr + off, mask).to(CDT)
        loc = load_rows(loc_ptr + off, mask).to(CDT)
        log_scale = load_rows(log_scale_ptr + off, mask).to(CDT)
    else:
        row = offs_n // C
        col = offs_n - row * C
        off_l = (row * s_lr + col * s_lc)[:, None] + (offs_k * s_lk)[None, :]
        off_m = (row * s_mr + col * s_mc)[:, None] + (offs_k * s_mk)[None, :]
        off_s = (row * s_sr + col * s_sc)[:, None] + (offs_k * s_sk)[None, :]
        logit = load_rows(logit_ptr + off_l, mask).to(CDT)
        loc = load_rows(loc_ptr + off_m, mask).to(CDT)
        log_scale = load_rows(log_scale_ptr + off_s, mask).to(CDT)
    logit = tl.where(mask_k[None, :], logit, -float("inf"))
    m, s = lse_parts(logit, FAST)
    log_pi = (logit - m[:, None]) - s[:, None]
    return log_pi, loc, log_scale, mask


@triton.jit
def component_parts(u, KIND: tl.constexpr, FAST: tl.constexpr):
    """log C, log(1-C) and log c of the standard component at u as log-free parts and a
    weight w: log C = c_part + log w, log(1-C) = s_part + log w, log c = d_part + 2 log w.

    Logistic: with e = exp(-|u|) and w = 1/(1 + e), C = w or e w and 1-C = e w or w (as
    u >= 0 or not), c = e w^2; so c_part = min(u, 0), s_part = -max(u, 0), d_part = -|u|, and
    a component needs no logarithm. Gaussian: the logarithms themselves and w = 1.
    """
    if KIND == 0:
        w = fast_rcp(1.0 + fast_exp(-tl.abs(u), FAST), FAST)
        c_part = tl.minimum(u, 0.0)
        s_part = -tl.maximum(u, 0.0)
        d_part = c_part + s_part
    else:
        c_part = log_ndtr(u)
        s_part = log_ndtr(-u)
        d_part = -0.5 * u * u - 0.9189385332046727  # log(2 pi) / 2
        w = 1.0
    return c_part, s_part, d_part, w


@triton.jit
def hazards(u, w, KIND: tl.constexpr, FAST: tl.constexpr):
    """c/(1-C), c/C and d log c/du of the standard component at u (w from
    :func:`component_parts`). Logistic: C, 1-C and (1-C) - C, straight from exp(-|u|) and w."""
    if KIND == 0:
        e = fast_exp(-tl.abs(u), FAST)
        h_sf = tl.where(u >= 0.0, 1.0, e) * w
        h_cdf = tl.where(u >= 0.0, e, 1.0) * w
        dlog_pdf = h_cdf - h_sf
    else:
        h_sf = tl.exp(gauss_log_hazard(u))
        h_cdf = tl.exp(gauss_log_hazard(-u))
        dlog_pdf = -u
    return h_sf, h_cdf, dlog_pdf


@triton.jit
def logistic_sums(x, pi, loc, inv_s, FAST: tl.constexpr):
    """F, 1 - F, f and f' of a logistic mixture at x [BLOCK_N], in probability space.

    With e = exp(-|u|) and w = 1/(1 + e) each component's C, 1 - C and c are w or e w, and
    e w^2: products, none formed by a subtraction, so the sums carry a few ulps of relative
    error whatever their size, down to where terms underflow (the callers check that the
    sums are not that small). f' uses c'/c = (1 - C) - C.
    """
    u = (x[:, None] - loc) * inv_s
    e = fast_exp(-tl.abs(u), FAST)
    w = fast_rcp(1.0 + e, FAST)
    ew = e * w
    upper = u >= 0.0
    cdf = tl.where(upper, w, ew)
    sf = tl.where(upper, ew, w)
    dens = pi * inv_s * (ew * w)
    big_f = tl.sum(pi * cdf, axis=1)
    big_s = tl.sum(pi * sf, axis=1)
    f = tl.sum(dens, axis=1)
    df = tl.sum(dens * (sf - cdf) * inv_s, axis=1)
    return big_f, big_s, f, df


@triton.jit
def f_floor(tiny, inv_s):
    """The smallest f [BLOCK_N] a probability-space sum gives exactly: tiny times the largest
    1/s of the row (and at least tiny). A term pi c flushes to zero below the smallest normal
    number before 1/s scales it, so with tiny scales f can be large and still have lost its
    largest term."""
    return tiny * tl.maximum(tl.max(inv_s, axis=1), 1.0)


@triton.jit
def forward_eval(x, log_pi, loc, log_scale, KIND: tl.constexpr, OUTPUT: tl.constexpr,
                  FAST: tl.constexpr):
    """(y, lad) of the forward map at x [BLOCK_N]; for OUTPUT 2, y is log f as well.

    Logistic with FAST: from :func:`logistic_sums` (y = log(F / (1 - F)) and
    lad = log(f / (F (1 - F))) for "logit": a ratio of sums, so nothing cancels in the tails
    either), and in log space (:func:`forward_eval_log`) for a tile with a row whose F,
    1 - F or f is below 1e-30 (1e-280 in float64), taken by those rows; for f, 1e-30 times
    the largest 1/s (:func:`f_floor`). Rows whose sums, or for "logit" whose f / (F (1 - F)),
    are not finite (1/s overflowing: u = +-inf makes c / s = 0 * inf, and x == loc makes
    u = 0 * inf) go there too: each test is written so that NaN fails it.
    """
    if KIND == 0 and FAST:
        if x.dtype == tl.float64:
            tiny = 1e-280
        else:
            tiny = 1e-30
        inv_s = tl.exp(-log_scale)
        pi = fast_exp(log_pi, FAST)
        big_f, big_s, f, _ = logistic_sums(x, pi, loc, inv_s, FAST)
        ok = (f >= f_floor(tiny, inv_s)) & (f < float("inf"))
        if OUTPUT != 2:
            ok = ok & (big_f >= tiny) & (big_s >= tiny)
        if OUTPUT == 1:
            ratio = f * fast_rcp(big_f * big_s, FAST)
            ok = ok & (ratio < float("inf"))
            ratio = tl.where(ok, ratio, 1.0)
        need = ~ok
        big_f = tl.where(need, 1.0, big_f)
        big_s = tl.where(need, 1.0, big_s)
        f = tl.where(need, 1.0, f)
        lad = sum_log(f, FAST)
        y = lad
        if OUTPUT == 0:
            # F from whichever of F, 1-F is below one half: both stay exact in the tails.
            y = tl.where(big_f < 0.5, big_f, 1.0 - big_s)
        if OUTPUT == 1:
            y = sum_log(big_f * fast_rcp(big_s, FAST), FAST)
            lad = sum_log(ratio, FAST)
        if tl.max(tl.where(need, 1, 0), axis=0) > 0:
            y_log, lad_log = forward_eval_log(x, log_pi, loc, log_scale, KIND, OUTPUT, FAST)
            y = tl.where(need, y_log, y)
            lad = tl.where(need, lad_log, lad)
    else:
        y, lad = forward_eval_log(x, log_pi, loc, log_scale, KIND, OUTPUT, FAST)
    return y, lad


@triton.jit
def forward_eval_log(x, log_pi, loc, log_scale, KIND: tl.constexpr, OUTPUT: tl.constexpr,
                      FAST: tl.constexpr):
    """:func:`forward_eval` in log space.

    Every logsumexp takes the components' log-free parts with their weights
    (:func:`component_parts`); for the logistic the weights are w or w^2. Where 1/s
    overflows, u is +-inf, and 0 at x == loc (not 0 * inf); where every component lies
    beyond float range on one side of x, the logit logabsdet takes its limit
    (:func:`_saturated_logit_lad`).
    """
    d = x[:, None] - loc
    u = tl.where(d == 0.0, 0.0, d * tl.exp(-log_scale))
    c_part, s_part, d_part, w = component_parts(u, KIND, FAST)
    m_f, s_f = weighted_lse_parts(log_pi + d_part - log_scale, w * w, FAST)
    lad = m_f + s_f
    y = lad
    if OUTPUT != 2:
        v_cdf = log_pi + c_part
        v_sf = log_pi + s_part
        m_c, s_c = weighted_lse_parts(v_cdf, w, FAST)
        m_s, s_s = weighted_lse_parts(v_sf, w, FAST)
        log_F = m_c + s_c
        log_S = m_s + s_s
        if OUTPUT == 0:
            # F from whichever of F, 1-F is below one half: both stay exact in the tails.
            y = tl.where(log_F < -0.6931471805599453, tl.exp(log_F), 1.0 - tl.exp(log_S))
        else:
            y = log_F - log_S
            # lad = log(f/(1-F)) - log F where y > 0, log(f/F) - log(1-F) elsewhere, each
            # a logsumexp of responsibility + log hazard (the naive log f - log F - log(1-F)
            # cancels catastrophically in the tails). Each element picks its side per
            # component first, so it takes one logsumexp, not two. The logistic hazards
            # c/(1-C) = C and c/C = 1-C have parts c_part and s_part and weight w; the
            # Gaussian ones are computed whole, both, then selected: they share their erfc
            # terms with log C and log(1-C), which a hazard at a selected +-u would not.
            upper = y > 0.0
            side = upper[:, None]
            resp = tl.where(side, (v_sf - m_s[:, None]) - s_s[:, None],
                            (v_cdf - m_c[:, None]) - s_c[:, None])
            if KIND == 0:
                log_h = tl.where(side, c_part, s_part)
            else:
                log_h = tl.where(side, gauss_log_hazard(u), gauss_log_hazard(-u))
                # A component without responsibility adds nothing, also at u = +-inf
                # where its hazard is +inf (the product is pi c / s over the sum: 0).
                log_h = tl.where(resp == -float("inf"), 0.0, log_h)
            m_h, s_h = weighted_lse_parts(resp + log_h - log_scale, w * w, FAST)
            lad = (m_h + s_h) - tl.where(upper, log_F, log_S)
            # 1 - F (y = +inf) or F (y = -inf) is 0 at a finite x: the hazard form is 0 / 0.
            sat = (tl.abs(y) == float("inf")) & (tl.abs(x) < float("inf"))
            if tl.max(tl.where(sat, 1, 0), axis=0) > 0:
                lim = _saturated_logit_lad(x, log_pi, loc, log_scale, sat, KIND)
                lad = tl.where(sat, lim, lad)
    return y, lad


@triton.jit
def _saturated_logit_lad(x, log_pi, loc, log_scale, sat, KIND: tl.constexpr):
    """The logit logabsdet [BLOCK_N] of the rows ``sat``, where every component with pi > 0
    lies beyond float range on one side of x (1 - F or F is 0; the other rows' values
    are not meaningful).

    The tail sum is dominated by the component with the smallest |u_k|,
    k* = argmin_k log|x - loc_k| - log s_k (taken without forming u), and f / (1 - F) tends
    to its hazard over its scale: lad = -log s_k* for the logistic (hazard -> 1),
    log|x - loc_k*| - 2 log s_k* for the Gaussian (hazard -> |u|). Exact ties in log|u_k|
    take the smallest candidate. Other rows' differences are masked to 1 (no log 0).
    """
    d = tl.where(sat[:, None], x[:, None] - loc, 1.0)
    log_u = tl.where(log_pi == -float("inf"), float("inf"), tl.log(tl.abs(d)) - log_scale)
    if KIND == 0:
        lim = -log_scale
    else:
        lim = log_u - log_scale
    nearest = log_u == tl.min(log_u, axis=1)[:, None]
    return tl.min(tl.where(nearest, lim, float("inf")), axis=1)


@triton.jit
def vjp_terms(x, log_pi, loc, log_scale, KIND: tl.constexpr, OUTPUT: tl.constexpr,
               FAST: tl.constexpr):
    """Per-component pieces of the forward's vector-Jacobian product at x.

    Returns (u, 1/s, resp_F, resp_S, resp_f, dlogF/du, dlogS/du negated, dlogf/du, log F,
    log(1-F)), the derivative tiles already weighted by the responsibilities. Where 1/s
    overflows u is +-inf, and 0 at x == loc (not 0 * inf).
    """
    inv_s = tl.exp(-log_scale)
    d = x[:, None] - loc
    u = tl.where(d == 0.0, 0.0, d * inv_s)
    c_part, s_part, d_part, w = component_parts(u, KIND, FAST)
    v_f = log_pi + d_part - log_scale
    m_f, s_f = weighted_lse_parts(v_f, w * w, FAST)
    resp_f = fast_exp((v_f - m_f[:, None]) - s_f[:, None], FAST) * (w * w)
    if OUTPUT != 2:
        v_cdf = log_pi + c_part
        v_sf = log_pi + s_part
        m_c, s_c = weighted_lse_parts(v_cdf, w, FAST)
        m_s, s_s = weighted_lse_parts(v_sf, w, FAST)
        resp_cdf = fast_exp((v_cdf - m_c[:, None]) - s_c[:, None], FAST) * w
        resp_sf = fast_exp((v_sf - m_s[:, None]) - s_s[:, None], FAST) * w
        log_F = m_c + s_c
        log_S = m_s + s_s
    else:
        resp_cdf = resp_f * 0.0
        resp_sf = resp_f * 0.0
        log_F = m_f * 0.0
        log_S = m_f * 0.0
    h_sf, h_cdf, dlog_pdf = hazards(u, w, KIND, FAST)
    du_cdf = resp_cdf * h_cdf
    du_sf = resp_sf * h_sf
    du_pdf = resp_f * dlog_pdf
    if KIND == 1:
        # At u = +-inf a Gaussian hazard and (log c)' = -u are infinite next to a zero
        # responsibility: the exact term is 0 (the logistic's are at most 1 in size).
        du_cdf = tl.where(resp_cdf == 0.0, 0.0, du_cdf)
        du_sf = tl.where(resp_sf == 0.0, 0.0, du_sf)
        du_pdf = tl.where(resp_f == 0.0, 0.0, du_pdf)
    return u, inv_s, resp_cdf, resp_sf, resp_f, du_cdf, du_sf, du_pdf, log_F, log_S


@triton.jit
def output_coefs(gy, gl, log_F, log_S, OUTPUT: tl.constexpr):
    """Cotangents on (log F, log(1-F), log f) from cotangents on the outputs (y, lad)."""
    if OUTPUT == 0:
        # dF = F dlog F = -(1-F) dlog(1-F): take the side below one half, where the
        # responsibilities differ from the weights by O(1) instead of cancelling.
        upper = log_F >= -0.6931471805599453
        c_cdf = tl.where(upper, 0.0, gy * tl.exp(log_F))
        c_sf = tl.where(upper, -gy * tl.exp(log_S), 0.0)
    elif OUTPUT == 1:
        c_cdf = gy - gl
        c_sf = -gy - gl
    else:
        c_cdf = gl * 0.0
        c_sf = gl * 0.0
    return c_cdf, c_sf, gl


@triton.jit
def vjp_assemble(
    c_cdf, c_sf, c_pdf, log_pi,
    u, inv_s, resp_cdf, resp_sf, resp_f, du_cdf, du_sf, du_pdf,
):
    """Grads to (x, logits, loc, log_scale) from cotangents on (log F, log(1-F), log f).

    A component beyond float range (u or 1/s infinite) has du = 0 exactly: its d/dloc and
    the u du of its d/dlog s are 0, not inf * 0.
    """
    du = c_cdf[:, None] * du_cdf - c_sf[:, None] * du_sf + c_pdf[:, None] * du_pdf
    zero_du = du == 0.0
    g_loc = tl.where(zero_du, 0.0, -du * inv_s)
    g_x = -tl.sum(g_loc, axis=1)
    g_log_scale = tl.where(zero_du, 0.0, -u * du) - c_pdf[:, None] * resp_f
    total = c_cdf + c_sf + c_pdf
    g_logit = (
        c_cdf[:, None] * resp_cdf + c_sf[:, None] * resp_sf + c_pdf[:, None] * resp_f
        - tl.exp(log_pi) * total[:, None]
    )
    return g_x, g_logit, g_loc, g_log_scale


@triton.jit
def _times(c, v):
    """c * v, and 0 wherever c is 0 even where v is infinite (an exact zero weight)."""
    return tl.where(c == 0.0, 0.0, c * v)


@triton.jit
def limit_vjp(gy, gl, x, log_pi, loc, log_scale, log_F, log_S, g_x, g_logit, g_loc,
               g_log_scale, KIND: tl.constexpr, OUTPUT: tl.constexpr):
    """The grads with, in the rows whose f is 0 at a finite x, the limits of the gradients
    (the reference's ``limit_vjp``, which derives them).

    Every component with pi > 0 lies beyond float range there, so each C_k is 0 or 1; the
    component nearest in units of its scale, k* = argmin_k log|u_k| (delta: one-hot there,
    exact ties split by pi), dominates f and each tail sum that is 0. With H = 1 (logistic)
    or |u*| (Gaussian): log f has d/dx = -sign(u*) H / s*, d/dlog s* = |u*| H and
    d/dlogit = delta - pi; the saturated logit lad (-log s* + log H) has d/dx = 0 or
    1 / (x - loc*) and d/dlog s* = -1 or -2, its y = +-inf dy/dx = e^lad,
    dy/dlog s* = -u* H and dy/dlogit = sign(u*) (pi - delta); with components on both
    sides of x only the logits move y (F = sum pi C is constant in x, loc and log s).
    d/dloc_k = -delta_k d/dx throughout.
    """
    d = x[:, None] - loc
    u = tl.where(d == 0.0, 0.0, d * tl.exp(-log_scale))
    c_part, s_part, d_part, w = component_parts(u, KIND, False)
    m_f, s_f = weighted_lse_parts(log_pi + d_part - log_scale, w * w, False)
    dead = ((m_f + s_f) == -float("inf")) & (tl.abs(x) < float("inf"))
    d = tl.where(dead[:, None], d, 1.0)
    log_u = tl.where(log_pi == -float("inf"), float("inf"), tl.log(tl.abs(d)) - log_scale)
    nearest = log_u == tl.min(log_u, axis=1)[:, None]
    lp = tl.where(nearest, log_pi, -float("inf"))
    e = tl.exp(lp - tl.max(lp, axis=1)[:, None])
    delta = e / tl.sum(e, axis=1)[:, None]
    pi = tl.exp(log_pi)
    # The nearest component's x - loc, log|u| and log s.
    d_n = tl.sum(delta * d, axis=1)
    log_u_n = tl.sum(tl.where(nearest, delta * log_u, 0.0), axis=1)
    ls_n = tl.sum(delta * log_scale, axis=1)
    sign = tl.where(d_n > 0.0, 1.0, -1.0)
    if KIND == 1:
        log_h = log_u_n
    else:
        log_h = log_u_n * 0.0
    # (d/dx, d/dlog s of k*, d/dlogit) of the logabsdet (lad_*) and of y (y_*).
    zero = tl.zeros_like(d_n)
    lad_x = -sign * tl.exp(log_h - ls_n)
    lad_s = tl.exp(log_u_n + log_h)
    lad_l = delta - pi
    y_x = zero
    y_s = zero
    y_l = tl.zeros_like(pi)
    if OUTPUT != 2:
        step = tl.where(d > 0.0, 1.0, 0.0)
        pi_F = pi * step
        pi_S = pi - pi_F
        big_f = tl.sum(pi_F, axis=1)
        if OUTPUT == 0:
            y_l = pi * (step - big_f[:, None])
        else:
            resp_F = pi_F / big_f[:, None]
            resp_S = pi_S / tl.sum(pi_S, axis=1)[:, None]
            y_l = resp_F - resp_S
            lad_l = delta + pi - resp_F - resp_S
            sat = (log_F == -float("inf")) | (log_S == -float("inf"))
            if KIND == 1:
                sat_x = 1.0 / d_n
                sat_s = zero - 2.0
            else:
                sat_x = zero
                sat_s = zero - 1.0
            y_x = tl.where(sat, tl.exp(log_h - ls_n), y_x)
            y_s = tl.where(sat, -sign * tl.exp(log_u_n + log_h), y_s)
            y_l = tl.where(sat[:, None], sign[:, None] * (pi - delta), y_l)
            lad_x = tl.where(sat, sat_x, lad_x)
            lad_s = tl.where(sat, sat_s, lad_s)
            lad_l = tl.where(sat[:, None], 0.0, lad_l)
    new_x = _times(gl, lad_x) + _times(gy, y_x)
    new_s = _times(gl, lad_s) + _times(gy, y_s)
    new_l = _times(gl[:, None], lad_l) + _times(gy[:, None], y_l)
    dead2 = dead[:, None]
    g_x = tl.where(dead, new_x, g_x)
    g_logit = tl.where(dead2, new_l, g_logit)
    g_loc = tl.where(dead2, _times(delta, -new_x[:, None]), g_loc)
    g_log_scale = tl.where(dead2, _times(delta, new_s[:, None]), g_log_scale)
    return g_x, g_logit, g_loc, g_log_scale


@triton.jit
def store_param_grads(g_logit_ptr, g_loc_ptr, g_log_scale_ptr, g_logit, g_loc, g_log_scale,
                       offs_n, mask, K, BLOCK_K: tl.constexpr, DENSE: tl.constexpr):
    """Store per-element parameter grads into contiguous (N, K) buffers (with DENSE, K is
    BLOCK_K and the stores are vectors)."""
    if DENSE:
        offs = offs_n[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    else:
        offs = offs_n[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(g_logit_ptr + offs, g_logit, mask=mask)
    tl.store(g_loc_ptr + offs, g_loc, mask=mask)
    tl.store(g_log_scale_ptr + offs, g_log_scale, mask=mask)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def head_params(
    h_ptr, s_hb, s_hh, w_ptr, s_wo, s_wh, b_ptr, s_bb, offs_b, mask_b, d, lim, K,
    CDT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, FAST: tl.constexpr,
):
    """Dimension d's mixture (log pi, loc, log_scale, lane mask), [BLOCK_B, BLOCK_K] tiles,
    from the first ``lim`` hidden units of rows offs_b. Bias row stride s_bb (0: shared)."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    # Output rows of dimension d: logits d*3K + k, locs d*3K + K + k, log-scales d*3K + 2K + k.
    row_l = d * 3 * K + offs_k
    acc_l = tl.zeros((BLOCK_B, BLOCK_K), dtype=CDT)
    acc_m = tl.zeros((BLOCK_B, BLOCK_K), dtype=CDT)
    acc_s = tl.zeros((BLOCK_B, BLOCK_K), dtype=CDT)
    # Hidden units are sorted by degree, so dimension d sees a prefix of them: stop there.
    for ht in range(0, tl.cdiv(lim, BLOCK_H)):
        offs_h = ht * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < lim
        hb = tl.load(h_ptr + offs_b[:, None] * s_hb + offs_h[None, :] * s_hh,
                     mask=mask_b[:, None] & mask_h[None, :], other=0.0)
        wmask = mask_k[:, None] & mask_h[None, :]
        w_off = offs_h[None, :] * s_wh
        w_l = tl.load(w_ptr + row_l[:, None] * s_wo + w_off, mask=wmask, other=0.0)
        w_m = tl.load(w_ptr + (row_l + K)[:, None] * s_wo + w_off, mask=wmask, other=0.0)
        w_s = tl.load(w_ptr + (row_l + 2 * K)[:, None] * s_wo + w_off, mask=wmask, other=0.0)
        if IEEE:
            acc_l += tl.dot(hb, tl.trans(w_l), input_precision="ieee")
            acc_m += tl.dot(hb, tl.trans(w_m), input_precision="ieee")
            acc_s += tl.dot(hb, tl.trans(w_s), input_precision="ieee")
        else:
            acc_l += tl.dot(hb, tl.trans(w_l))
            acc_m += tl.dot(hb, tl.trans(w_m))
            acc_s += tl.dot(hb, tl.trans(w_s))
    b_rows = b_ptr + offs_b[:, None] * s_bb
    bmask = mask_b[:, None] & mask_k[None, :]
    logit = acc_l + tl.load(b_rows + row_l[None, :], mask=bmask, other=0.0).to(CDT)
    loc = acc_m + tl.load(b_rows + (row_l + K)[None, :], mask=bmask, other=0.0).to(CDT)
    log_scale = acc_s + tl.load(b_rows + (row_l + 2 * K)[None, :], mask=bmask,
                                other=0.0).to(CDT)
    logit = tl.where(mask_k[None, :], logit, -float("inf"))
    m, s = lse_parts(logit, FAST)
    log_pi = (logit - m[:, None]) - s[:, None]
    return log_pi, loc, log_scale, mask_b[:, None] & mask_k[None, :]
