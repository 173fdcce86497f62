"""@triton.jit device helpers: stable log-space special functions.

Written from exp/log/where only, so they run under TRITON_INTERPRET=1 (which lacks
tl.math.log1p, tl.math.tanh and libdevice) and on Triton 3.6+ GPUs alike. They compute in
the dtype of their argument (float32 or float64).
"""

import triton
import triton.language as tl

# Constants appear as literals inside @triton.jit code: compiled Triton refuses module-level
# Python floats (a `: tl.constexpr` annotation does not help), and the interpreter does not
# check. log 2 = 0.6931471805599453, log(2 pi) / 2 = 0.9189385332046727,
# 1 / sqrt 2 = 0.7071067811865476.


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
def log_erfcx(z):
    """log(erfc(z) exp(z^2)) for z >= 0: smooth, about -log(sqrt(pi) z) for large z.

    float32: the Chebyshev fit above (relative error of erfc < 1.2e-7). float64: the series
    erf(z) = 2/sqrt(pi) z exp(-z^2) sum_n (2z^2)^n / (2n+1)!! below z = 2, the continued
    fraction erfc(z) = exp(-z^2) / (sqrt(pi) (z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))))
    from z = 2 on; 40 terms each give about 1e-13 relative.
    """
    if z.dtype == tl.float64:
        zs = tl.minimum(z, 2.0)
        two_z2 = 2.0 * zs * zs
        term = zs * 0.0 + 1.0
        total = zs * 0.0
        for n in range(40):
            total += term
            term = term * two_z2 / (2.0 * n + 3.0)
        erf = 1.1283791670955126 * zs * tl.exp(-zs * zs) * total
        series = log1p(-erf) + zs * zs
        zc = tl.maximum(z, 2.0)
        frac = zc
        for i in range(40):
            frac = zc + (0.5 * (40 - i)) / frac
        cont = -tl.log(1.7724538509055159 * frac)
        r = tl.where(z < 2.0, series, cont)
    else:
        t = 1.0 / (1.0 + 0.5 * z)
        r = tl.log(t) + _erfc_log_poly(t)
    return r


@triton.jit
def log_ndtr(v):
    """log Phi(v), the standard normal log-CDF, accurate in both tails.

    v < 0: log(erfc(|v|/sqrt 2) / 2) in log space (no underflow); v >= 0:
    log1p(-erfc(v/sqrt 2) / 2), which keeps the tiny upper-tail mass. The factor exp(-v^2/2)
    is split as exp(-a^2/2) exp(-(v^2 - a^2)/2) with a = |v| rounded to 1/16, whose square is
    exact, so the tail mass keeps full relative precision (Cephes' expx2 idea).
    """
    av = tl.abs(v)
    a = (tl.minimum(av, 64.0) * 16.0 + 0.5).to(tl.int32).to(v.dtype) * 0.0625
    half_sq_hi = 0.5 * a * a
    rest = log_erfcx(av * 0.7071067811865476) - 0.5 * (av - a) * (av + a)
    lower = (rest - 0.6931471805599453) - half_sq_hi  # one rounding at the large magnitude
    upper = log1p(-0.5 * tl.exp(-half_sq_hi) * tl.exp(rest))
    return tl.where(v < 0.0, lower, upper)


@triton.jit
def gauss_log_hazard(v):
    """log(phi(v) / Phi(-v)): for v >= 0 the exp(-v^2/2) factors cancel analytically.

    The upper branch takes log_erfcx at |v| (equal to v where it is selected), the very
    expression log_ndtr(+-v) evaluates, so the compiler computes it once for all three.
    """
    upper = (0.6931471805599453 - 0.9189385332046727
             - log_erfcx(tl.abs(v) * 0.7071067811865476))
    lower = -0.5 * v * v - 0.9189385332046727 - log_ndtr(-v)
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


@triton.jit
def weighted_lse_parts(v, w):
    """lse_parts of v + log w, for weights w in [1/4, 1] (or the scalar 1.0): the weights
    multiply the exponentials, so no logarithm of them is taken."""
    m = tl.max(v, axis=1)
    m = tl.where(m == -float("inf"), 0.0, m)
    s = tl.log(tl.sum(tl.exp(v - m[:, None]) * w, axis=1))
    return m, s
