"""@triton.jit device helpers: stable log-space special functions.

Written from exp/log/where only, so they run under TRITON_INTERPRET=1 (which lacks
tl.math.log1p, tl.math.tanh and libdevice) and on Triton 3.6+ GPUs alike. They compute in
the dtype of their argument (float32 or float64).
"""

import triton
import triton.language as tl

LN2: tl.constexpr = 0.6931471805599453
HALF_LOG_2PI: tl.constexpr = 0.9189385332046727
INV_SQRT2: tl.constexpr = 0.7071067811865476


@triton.jit
def log1p(x):
    """log(1 + x) to full relative precision for small |x| (Goldberg's correction)."""
    u = 1.0 + x
    d = u - 1.0
    small = d == 0.0
    return tl.where(small, x, tl.log(u) * (x / tl.where(small, 1.0, d)))


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _erfc_log_poly(t):
    """Chebyshev fit of log(erfc(z) / t) + z^2, t = 1/(1 + z/2): relative error < 1.2e-7."""
    p = 0.17087277
    p = -0.82215223 + t * p
    p = 1.48851587 + t * p
    p = -1.13520398 + t * p
    p = 0.27886807 + t * p
    p = -0.18628806 + t * p
    p = 0.09678418 + t * p
    p = 0.37409196 + t * p
    p = 1.00002368 + t * p
    return -1.26551223 + t * p


@triton.jit
def log_ndtr(v):
    """log Phi(v), the standard normal log-CDF, accurate in both tails.

    v < 0: log(erfc(|v|/sqrt 2) / 2) straight from the log-space fit (no underflow);
    v >= 0: log1p(-erfc(v/sqrt 2) / 2), which keeps the tiny upper-tail mass.
    """
    z = tl.abs(v) * INV_SQRT2
    t = 1.0 / (1.0 + 0.5 * z)
    log_erfc = tl.log(t) - z * z + _erfc_log_poly(t)
    return tl.where(v < 0.0, log_erfc - LN2, log1p(-0.5 * tl.exp(log_erfc)))


@triton.jit
def gauss_log_hazard(v):
    """log(phi(v) / Phi(-v)): for v >= 0 the exp(-v^2/2) factors cancel analytically."""
    z = tl.maximum(v, 0.0) * INV_SQRT2
    t = 1.0 / (1.0 + 0.5 * z)
    upper = LN2 - HALF_LOG_2PI - tl.log(t) - _erfc_log_poly(t)
    lower = -0.5 * v * v - HALF_LOG_2PI - log_ndtr(-v)
    return tl.where(v >= 0.0, upper, lower)


@triton.jit
def lse_parts(v):
    """Row-wise logsumexp of a [BLOCK_N, BLOCK_K] tile as (max, log-sum): lse = m + s.

    Kept apart so responsibilities (v - m) - s do not lose digits when m is large.
    Rows of -inf give (0, -inf).
    """
    m = tl.max(v, axis=1)
    m = tl.where(m == -float("inf"), 0.0, m)
    s = tl.log(tl.sum(tl.exp(v - m[:, None]), axis=1))
    return m, s
