"""Mixture-CDF forward and backward: Triton kernels and their host launchers.

Layout. ``x`` is flattened to N = R * C elements (C = its last dimension); each parameter is a
(R, C, K) view with its own strides, so shared (D, K) parameters broadcast with stride 0 and
are never materialised. A program handles BLOCK_N elements and all K components as a
[BLOCK_N, BLOCK_K] tile (BLOCK_K = next power of two >= K, masked).

Modes. KIND: 0 logistic, 1 Gaussian. OUTPUT: 0 "unit" (y = F, lad = log f), 1 "logit"
(y = logit F, lad = log|dy/dx|), 2 "density" (lad = log f only).
"""

import torch
import triton
import triton.language as tl

from .device import (
    forward_eval,
    limit_vjp,
    load_mixture,
    output_coefs,
    store_param_grads,
    vjp_assemble,
    vjp_terms,
)
from .launch import KINDS, OUTPUTS, alloc_grads, cdiv, cotangent, param_views, tile, tl_dtype

# Tile lanes (BLOCK_N * BLOCK_K) and warps per program of the elementwise kernels on a GPU
# (bench/investigations/tune_gpu.py sweeps them): "num_warps" for the forward, "bwd_warps" for the
# backward. The backward takes fewer warps (fewer instructions per element); the forward keeps 4
# where it is not memory-bound. Measurements and history: docs/tuning.md.
LAUNCH = {"lanes": 1024, "num_warps": 4, "bwd_warps": 2}


@triton.jit
def _mixture_cdf_fwd_kernel(
    # pointers: input, parameters, outputs
    x_ptr, logit_ptr, loc_ptr, log_scale_ptr, y_ptr, lad_ptr,
    # strides of each parameter's (row, col, component) view
    s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
    # sizes: elements, columns (last dim of x), components
    N, C, K,
    # flags and block sizes
    KIND: tl.constexpr, OUTPUT: tl.constexpr, CDT: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x = tl.load(x_ptr + offs_n, mask=mask_n, other=0.0).to(CDT)
    log_pi, loc, log_scale, _ = load_mixture(
        logit_ptr, loc_ptr, log_scale_ptr, s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
        offs_n, mask_n, C, K, BLOCK_K, CDT, DENSE, True,
    )
    y, lad = forward_eval(x, log_pi, loc, log_scale, KIND, OUTPUT, True)
    if OUTPUT != 2:
        tl.store(y_ptr + offs_n, y, mask=mask_n)
    tl.store(lad_ptr + offs_n, lad, mask=mask_n)


@triton.jit
def _mixture_cdf_bwd_kernel(
    # pointers: cotangents, input, parameters, gradient outputs
    gy_ptr, gl_ptr, x_ptr, logit_ptr, loc_ptr, log_scale_ptr,
    g_x_ptr, g_logit_ptr, g_loc_ptr, g_log_scale_ptr,
    # element strides of the cotangents (1, or 0 for one value broadcast), then of each
    # parameter's (row, col, component) view
    s_gy, s_gl, s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
    # sizes: elements, columns (last dim of x), components
    N, C, K,
    # flags and block sizes
    KIND: tl.constexpr, OUTPUT: tl.constexpr, CDT: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x = tl.load(x_ptr + offs_n, mask=mask_n, other=0.0).to(CDT)
    gl = tl.load(gl_ptr + offs_n * s_gl, mask=mask_n, other=0.0).to(CDT)
    if OUTPUT != 2:
        gy = tl.load(gy_ptr + offs_n * s_gy, mask=mask_n, other=0.0).to(CDT)
    else:
        gy = gl * 0.0
    # At x = +-inf the map is flat at its limits: no gradient to anything (zero cotangents at
    # x = 0 give exact zeros, where inf * 0 = NaN would reach the shared parameters' sums).
    far = tl.abs(x) == float("inf")
    x = tl.where(far, 0.0, x)
    gl = tl.where(far, 0.0, gl)
    gy = tl.where(far, 0.0, gy)
    log_pi, loc, log_scale, mask = load_mixture(
        logit_ptr, loc_ptr, log_scale_ptr, s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
        offs_n, mask_n, C, K, BLOCK_K, CDT, DENSE, True,
    )
    u, inv_s, r_cdf, r_sf, r_f, du_cdf, du_sf, du_pdf, log_F, log_S = vjp_terms(
        x, log_pi, loc, log_scale, KIND, OUTPUT, True
    )
    c_cdf, c_sf, c_pdf = output_coefs(gy, gl, log_F, log_S, OUTPUT)
    g_x, g_logit, g_loc, g_log_scale = vjp_assemble(
        c_cdf, c_sf, c_pdf, log_pi, u, inv_s, r_cdf, r_sf, r_f, du_cdf, du_sf, du_pdf
    )
    # An element whose f is 0 at a finite x (every component beyond float range) has 0 / 0
    # responsibilities, which make its g_x NaN: such tiles take the gradients' limits.
    dead = (g_x != g_x) & (tl.abs(x) < float("inf"))
    if tl.max(tl.where(dead, 1, 0), axis=0) > 0:
        g_x, g_logit, g_loc, g_log_scale = limit_vjp(
            gy, gl, x, log_pi, loc, log_scale, log_F, log_S,
            g_x, g_logit, g_loc, g_log_scale, KIND, OUTPUT,
        )
    tl.store(g_x_ptr + offs_n, g_x, mask=mask_n)
    store_param_grads(g_logit_ptr, g_loc_ptr, g_log_scale_ptr, g_logit, g_loc, g_log_scale,
                       offs_n, mask, K, BLOCK_K, DENSE)


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------
def mixture_cdf_fwd(x, logits, loc, log_scale, kind: str, output: str):
    """Launch the forward: (y, lad) in x's dtype; y is None for output "density"."""
    K = logits.shape[-1]
    lad = torch.empty_like(x, memory_format=torch.contiguous_format)
    y = None if output == "density" else torch.empty_like(lad)
    N = x.numel()
    if N == 0:
        return y, lad
    x_flat, _, cols, views, strides = param_views(x, logits, loc, log_scale)
    block_n, block_k, mode = tile(views, LAUNCH)
    _mixture_cdf_fwd_kernel[(cdiv(N, block_n),)](
        x_flat, *views, lad if y is None else y, lad,
        *strides, N, cols, K,
        KIND=KINDS[kind], OUTPUT=OUTPUTS[output], CDT=tl_dtype(x.dtype),
        DENSE=mode,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=LAUNCH["num_warps"],
    )
    return y, lad


def mixture_cdf_bwd(grad_y, grad_lad, x, logits, loc, log_scale, kind: str, output: str):
    """Launch the backward: grads to (x, logits, loc, log_scale), per element, compute dtype."""
    K = logits.shape[-1]
    g_x, g_params = alloc_grads(x, K)
    N = x.numel()
    if N == 0:
        return [g_x, *g_params]
    x_flat, _, cols, views, strides = param_views(x, logits, loc, log_scale)
    gl, s_gl = cotangent(grad_lad)
    gy, s_gy = (gl, s_gl) if grad_y is None else cotangent(grad_y)
    block_n, block_k, mode = tile(views, LAUNCH, warps="bwd_warps")
    _mixture_cdf_bwd_kernel[(cdiv(N, block_n),)](
        gy, gl, x_flat, *views, g_x, *g_params,
        s_gy, s_gl, *strides, N, cols, K,
        KIND=KINDS[kind], OUTPUT=OUTPUTS[output], CDT=tl_dtype(x.dtype),
        DENSE=mode,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=LAUNCH["bwd_warps"],
    )
    return [g_x, *g_params]
