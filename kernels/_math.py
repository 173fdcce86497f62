"""@triton.jit device helpers: stable log-space special functions.

Written from exp/log/where only, so they run under TRITON_INTERPRET=1 (which lacks
tl.math.log1p, tl.math.tanh and libdevice) and on Triton 3.6+ GPUs alike; the one exception
is the compiled path of ``fast_exp``, ``fast_rcp`` and ``sum_log`` (inline PTX approximations,
emulated on the CPU by FASTFLOW_APPROX_ERRORS). They compute in the dtype of their argument
(float32 or float64).
"""

import os

import triton
import triton.language as tl

# Constants appear as literals inside @triton.jit code: compiled Triton refuses module-level
# Python floats (a `: tl.constexpr` annotation does not help), and the interpreter does not
# check. log 2 = 0.6931471805599453, log(2 pi) / 2 = 0.9189385332046727,
# 1 / sqrt 2 = 0.7071067811865476.

# Whether the kernels are compiled (a GPU) rather than interpreted. Triton decides the same way,
# from TRITON_INTERPRET when the kernels are defined. Module-level constexprs are allowed.
COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
# Interpreted with FASTFLOW_APPROX_ERRORS=1: fast_exp, fast_rcp and sum_log add errors of the
# size the compiled kernels' hardware approximations are documented to have (and flush as
# they do), so the accuracy tests check the contract against them on a CPU
# (tests/test_approx.py).
EMULATE = tl.constexpr(not COMPILED and os.environ.get("FASTFLOW_APPROX_ERRORS") == "1")


@triton.jit
def _error_sign(v):
    """+-1, a deterministic pattern over the values: errors that do not cancel on average."""
    bit = (tl.abs(v) * 8388608.0).to(tl.int64) % 2
    return tl.where(bit == 0, 1.0, -1.0)


@triton.jit
def fast_exp(d, FAST: tl.constexpr):
    """exp d where a subnormal result may flush to 0 and a few ulps do not matter: the
    logsumexps' terms (d <= 0 against a largest term of 1), the responsibilities, exp(-|u|)
    (which only ever meets 1 + e or a hazard that vanishes with it). Not 1/scale: an error
    there moves u, and the Gaussian's gradients amplify it past the kernel-vs-reference
    tolerance (seen with FASTFLOW_APPROX_ERRORS). Compiled float32: one ex2.approx.ftz after
    the scaling by log2 e (relative error about 2^-22), without tl.exp's steps for subnormal
    results; elsewhere tl.exp."""
    if COMPILED and FAST:
        if d.dtype == tl.float32:
            r = _ptx_f32(d * 1.4426950408889634, "ex2.approx.ftz.f32 $0, $1;")
        else:
            r = tl.exp(d)
    else:
        r = tl.exp(d)
        if EMULATE and FAST:
            if d.dtype == tl.float32:
                # 2^-22 relative, and results below 2^-126 flushed
                r = tl.where(d < -87.33654475, 0.0, r * (1.0 + 2.384185791015625e-07
                                                           * _error_sign(d)))
    return r


@triton.jit
def _ptx_f32(x, ASM: tl.constexpr):
    """One float32 PTX instruction ``ASM`` ("op $0, $1;"), elementwise."""
    return tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def fast_rcp(x, FAST: tl.constexpr):
    """1 / x for normal x whose reciprocal is normal (1 + e in [1, 2], sums in [1e-30, K]).
    Compiled float32: one rcp.approx.ftz (relative error about 2^-23), without the division's
    range checks; elsewhere 1 / x."""
    if COMPILED and FAST:
        if x.dtype == tl.float32:
            r = _ptx_f32(x, "rcp.approx.ftz.f32 $0, $1;")
        else:
            r = 1.0 / x
    else:
        r = 1.0 / x
        if EMULATE and FAST:
            if x.dtype == tl.float32:
                r = r * (1.0 + 1.1920928955078125e-07 * _error_sign(x))
    return r


@triton.jit
def sum_log(s, FAST: tl.constexpr):
    """log s where an absolute error of about 1e-7 is fine: the logsumexps' sums (in [1/4, K],
    0 for an all -inf row, or NaN) and the probability-space outputs log(F / (1 - F)),
    log(f / (F (1 - F))) and log f (s positive and normal). Compiled float32: the hardware's
    lg2.approx (absolute error below 2^-22 in log2 over the normal range) instead of tl.log's
    27-instruction polynomial; elsewhere tl.log. Not for logarithms whose relative error
    matters near 1 (log1p, the Gaussian tail)."""
    if COMPILED and FAST:
        if s.dtype == tl.float32:
            r = _ptx_f32(s, "lg2.approx.ftz.f32 $0, $1;") * 0.6931471805599453
        else:
            r = tl.log(s)
    else:
        r = tl.log(s)
        if EMULATE and FAST:
            if s.dtype == tl.float32:
                # lg2.approx's 2^-22.6 absolute in log2 is 1.1e-7 in log; rounded up
                r = r + 1.1920928955078125e-07 * _error_sign(s)
    return r


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
def lse_parts(v, FAST: tl.constexpr):
    """Row-wise logsumexp of a [BLOCK_N, BLOCK_K] tile as (max, log-sum): lse = m + s.

    Kept apart so responsibilities (v - m) - s do not lose digits when m is large.
    Rows of -inf give (0, -inf).
    """
    m = tl.max(v, axis=1)
    m = tl.where(m == -float("inf"), 0.0, m)
    s = sum_log(tl.sum(fast_exp(v - m[:, None], FAST), axis=1), FAST)
    return m, s


@triton.jit
def weighted_lse_parts(v, w, FAST: tl.constexpr):
    """lse_parts of v + log w, for weights w in [1/4, 1] (or the scalar 1.0): the weights
    multiply the exponentials, so no logarithm of them is taken."""
    m = tl.max(v, axis=1)
    m = tl.where(m == -float("inf"), 0.0, m)
    s = sum_log(tl.sum(fast_exp(v - m[:, None], FAST) * w, axis=1), FAST)
    return m, s
