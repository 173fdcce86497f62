"""Mixture-CDF inverse by bracketed bisection, and its backward by implicit differentiation.

Bracket: logit F(x) is a convex-combination-like blend of the components' logits, so the root
for target t lies between the components' own inverses min_k x_k(t) and max_k x_k(t). The
search runs in logit space for both outputs (a unit target z becomes log z - log(1-z)), a fixed
number of bisection steps, then safeguarded Newton steps that fall back to bisection whenever
they leave the bracket. No host synchronisation: every count is a compile-time constant.
"""

import torch
import triton
import triton.language as tl

from ._math import log1p, lse_parts, softplus
from .mixture_cdf import (
    KINDS,
    OUTPUTS,
    _forward_eval,
    _load_mixture,
    _log_cdf_sf,
    _output_coefs,
    _store_param_grads,
    _tl_dtype,
    _vjp_assemble,
    _vjp_terms,
    alloc_grads,
    block_sizes,
    flat,
    param_views,
)

# Tile lanes and warps per program of the inverse kernels on a GPU (bench/tune_gpu.py).
LAUNCH = {"lanes": 512, "num_warps": 4}

# Bracket padding for the Gaussian quantile approximation (error < 4.5e-4), in scale units.
GAUSS_BRACKET_PAD: tl.constexpr = 1e-3


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
def _logit_eval(x, log_pi, loc, inv_s, KIND: tl.constexpr):
    """logit F(x): all that bisection compares with the target."""
    log_cdf, log_sf = _log_cdf_sf((x[:, None] - loc) * inv_s, KIND)
    m_c, s_c = lse_parts(log_pi + log_cdf)
    m_s, s_s = lse_parts(log_pi + log_sf)
    return (m_c + s_c) - (m_s + s_s)


@triton.jit
def _target_logit(y, OUTPUT: tl.constexpr):
    """The target in logit space: y itself, or log z - log(1 - z) for unit targets."""
    if OUTPUT == 1:
        t = y
    else:
        t = tl.log(y) - log1p(-y)
    return t


@triton.jit
def _solve(t, log_pi, loc, log_scale, mask, KIND: tl.constexpr, OUTPUT: tl.constexpr,
           BISECT_STEPS: tl.constexpr, NEWTON_STEPS: tl.constexpr):
    """(x, lad) with logit F(x) = t for a [BLOCK_N] target and [BLOCK_N, BLOCK_K] mixtures
    (lad = log|dx/dy| for the output kind); shared by the inverse and autoregressive kernels."""
    scale = tl.exp(log_scale)
    inv_s = tl.exp(-log_scale)
    if KIND == 0:
        pad = 0.0
    else:
        pad = GAUSS_BRACKET_PAD
    u_t = _component_quantile(t, KIND)[:, None]
    lo = tl.min(tl.where(mask, loc + scale * (u_t - pad), float("inf")), axis=1)
    hi = tl.max(tl.where(mask, loc + scale * (u_t + pad), -float("inf")), axis=1)
    for _ in range(BISECT_STEPS):
        mid = 0.5 * lo + 0.5 * hi
        below = _logit_eval(mid, log_pi, loc, inv_s, KIND) < t
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    x = 0.5 * lo + 0.5 * hi
    for _ in range(NEWTON_STEPS):
        g, g_lad = _forward_eval(x, log_pi, loc, log_scale, KIND, 1)
        below = g < t
        lo = tl.where(below, x, lo)
        hi = tl.where(below, hi, x)
        x_new = x - (g - t) * tl.exp(-g_lad)
        x = tl.where((x_new > lo) & (x_new < hi), x_new, 0.5 * lo + 0.5 * hi)
    _, lad = _forward_eval(x, log_pi, loc, log_scale, KIND, OUTPUT)
    lad = -lad
    # Boundary targets map to +-inf with logabsdet +inf; NaN targets stay NaN.
    infinite = tl.abs(t) == float("inf")
    x = tl.where(infinite, t, x)
    lad = tl.where(infinite, float("inf"), lad)
    nan = t != t
    x = tl.where(nan, t, x)
    lad = tl.where(nan, t, lad)
    return x, lad


@triton.jit
def _mixture_cdf_inverse_fwd_kernel(
    # pointers: targets, parameters, outputs
    y_ptr, logit_ptr, loc_ptr, log_scale_ptr, x_ptr, lad_ptr,
    # strides of each parameter's (row, col, component) view
    s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
    # sizes: elements, columns (last dim of y), components
    N, C, K,
    # flags, iteration counts and block sizes
    KIND: tl.constexpr, OUTPUT: tl.constexpr, CDT: tl.constexpr,
    BISECT_STEPS: tl.constexpr, NEWTON_STEPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = _target_logit(tl.load(y_ptr + offs_n, mask=mask_n, other=0.5).to(CDT), OUTPUT)
    log_pi, loc, log_scale, mask = _load_mixture(
        logit_ptr, loc_ptr, log_scale_ptr, s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
        offs_n, mask_n, C, K, BLOCK_K, CDT,
    )
    x, lad = _solve(t, log_pi, loc, log_scale, mask, KIND, OUTPUT, BISECT_STEPS, NEWTON_STEPS)
    tl.store(x_ptr + offs_n, x, mask=mask_n)
    tl.store(lad_ptr + offs_n, lad, mask=mask_n)


@triton.jit
def _mixture_cdf_inverse_bwd_kernel(
    # pointers: cotangents, the inverse's solution, parameters, gradient outputs
    gx_ptr, gl_ptr, x_ptr, logit_ptr, loc_ptr, log_scale_ptr,
    g_y_ptr, g_logit_ptr, g_loc_ptr, g_log_scale_ptr,
    # strides of each parameter's (row, col, component) view
    s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
    # sizes: elements, columns (last dim of x), components
    N, C, K,
    # flags and block sizes
    KIND: tl.constexpr, OUTPUT: tl.constexpr, CDT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x = tl.load(x_ptr + offs_n, mask=mask_n, other=0.0).to(CDT)
    finite = tl.abs(x) < float("inf")
    x = tl.where(finite, x, 0.0)
    cx = tl.where(finite, tl.load(gx_ptr + offs_n, mask=mask_n, other=0.0).to(CDT), 0.0)
    cl = tl.where(finite, tl.load(gl_ptr + offs_n, mask=mask_n, other=0.0).to(CDT), 0.0)
    log_pi, loc, log_scale, mask = _load_mixture(
        logit_ptr, loc_ptr, log_scale_ptr, s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
        offs_n, mask_n, C, K, BLOCK_K, CDT,
    )
    _, lad = _forward_eval(x, log_pi, loc, log_scale, KIND, OUTPUT)
    u, inv_s, r_cdf, r_sf, r_f, du_cdf, du_sf, du_pdf, log_F, log_S = _vjp_terms(
        x, log_pi, loc, log_scale, KIND, OUTPUT
    )
    # d lad / dx of the forward: its VJP with cotangents (0, 1).
    c_cdf, c_sf, c_pdf = _output_coefs(cx * 0.0, cx * 0.0 + 1.0, log_F, log_S, OUTPUT)
    dlad_dx, _, _, _ = _vjp_assemble(
        c_cdf, c_sf, c_pdf, log_pi, u, inv_s, r_cdf, r_sf, r_f, du_cdf, du_sf, du_pdf
    )
    # Implicit differentiation: grad_y = w, grad_theta = forward VJP with cotangents (-w, -cl).
    w = tl.where(finite, (cx - cl * dlad_dx) * tl.exp(-lad), 0.0)
    c_cdf, c_sf, c_pdf = _output_coefs(-w, -cl, log_F, log_S, OUTPUT)
    _, g_logit, g_loc, g_log_scale = _vjp_assemble(
        c_cdf, c_sf, c_pdf, log_pi, u, inv_s, r_cdf, r_sf, r_f, du_cdf, du_sf, du_pdf
    )
    tl.store(g_y_ptr + offs_n, w, mask=mask_n)
    _store_param_grads(g_logit_ptr, g_loc_ptr, g_log_scale_ptr, g_logit, g_loc, g_log_scale,
                       offs_n, mask, K, BLOCK_K)


def mixture_cdf_inverse_fwd(
    y, logits, loc, log_scale, kind: str, output: str, bisect_steps: int, newton_steps: int
):
    """Launch the inverse: (x, lad) in y's dtype, lad = log|dx/dy|."""
    K = logits.shape[-1]
    x = torch.empty_like(y, memory_format=torch.contiguous_format)
    lad = torch.empty_like(x)
    N = y.numel()
    if N == 0:
        return x, lad
    y_flat, _, cols, views, strides = param_views(y, logits, loc, log_scale)
    block_n, block_k = block_sizes(K, LAUNCH["lanes"])
    _mixture_cdf_inverse_fwd_kernel[(triton.cdiv(N, block_n),)](
        y_flat, *views, x, lad,
        *strides, N, cols, K,
        KIND=KINDS[kind], OUTPUT=OUTPUTS[output], CDT=_tl_dtype(y.dtype),
        BISECT_STEPS=bisect_steps, NEWTON_STEPS=newton_steps,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=LAUNCH["num_warps"],
    )
    return x, lad


def mixture_cdf_inverse_bwd(grad_x, grad_lad, x, logits, loc, log_scale, kind: str, output: str):
    """Launch the inverse's backward: grads to (y, logits, loc, log_scale), compute dtype."""
    K = logits.shape[-1]
    g_y, g_params = alloc_grads(x, K)
    N = x.numel()
    if N == 0:
        return [g_y, *g_params]
    x_flat, _, cols, views, strides = param_views(x, logits, loc, log_scale)
    block_n, block_k = block_sizes(K, LAUNCH["lanes"])
    _mixture_cdf_inverse_bwd_kernel[(triton.cdiv(N, block_n),)](
        flat(grad_x), flat(grad_lad), x_flat, *views, g_y, *g_params,
        *strides, N, cols, K,
        KIND=KINDS[kind], OUTPUT=OUTPUTS[output], CDT=_tl_dtype(x.dtype),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=LAUNCH["num_warps"],
    )
    return [g_y, *g_params]
