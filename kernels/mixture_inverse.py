"""Mixture-CDF inverse by safeguarded Newton iteration, and its backward by implicit
differentiation.

Bracket: logit F(x) is a convex-combination-like blend of the components' logits, so the root
for target t lies between the components' own inverses min_k x_k(t) and max_k x_k(t). The
search runs in logit space for both outputs (a unit target z becomes log z - log(1-z)): Newton
steps on logit F, evaluated in log space, from the pi-weighted mean of the components'
inverses, falling back to bisection whenever a step leaves the bracket or fails to halve.
Each tile loops until all its elements have converged (typically a handful of evaluations);
past a compile-time count of iterations the elements still active only bisect, in the floats'
integer order, at most one more iteration per bit of the dtype. No host synchronisation.
"""

import torch
import triton
import triton.language as tl

from .device import (
    forward_eval,
    load_mixture,
    output_coefs,
    store_param_grads,
    vjp_assemble,
    vjp_terms,
)
from .launch import (
    KINDS,
    OUTPUTS,
    alloc_grads,
    cdiv,
    cotangent,
    param_views,
    tile,
    tile_rows,
    tl_dtype,
)
from .solve import solve, target_logit

# Tile lanes and warps per program of the inverse kernels on a GPU
# (bench/investigations/tune_gpu.py): one warp of whole elements per program, the fastest W3
# measured; the backward launches with the same table. Measurements and history: docs/tuning.md.
LAUNCH = {"lanes": 256, "num_warps": 1}


@triton.jit
def _mixture_cdf_inverse_fwd_kernel(
    # pointers: targets, parameters, outputs, per-program iteration counts (if COUNT)
    y_ptr, logit_ptr, loc_ptr, log_scale_ptr, x_ptr, lad_ptr, steps_ptr,
    # strides of each parameter's (row, col, component) view
    s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
    # sizes: elements, columns (last dim of y), components
    N, C, K,
    # flags, iteration cap and block sizes
    KIND: tl.constexpr, OUTPUT: tl.constexpr, CDT: tl.constexpr, DENSE: tl.constexpr,
    MAX_STEPS: tl.constexpr, COUNT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = target_logit(tl.load(y_ptr + offs_n, mask=mask_n, other=0.5).to(CDT), OUTPUT)
    log_pi, loc, log_scale, mask = load_mixture(
        logit_ptr, loc_ptr, log_scale_ptr, s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
        offs_n, mask_n, C, K, BLOCK_K, CDT, DENSE, True,
    )
    x, lad, steps = solve(t, log_pi, loc, log_scale, mask, mask_n, KIND, OUTPUT, MAX_STEPS,
                           True)
    tl.store(x_ptr + offs_n, x, mask=mask_n)
    tl.store(lad_ptr + offs_n, lad, mask=mask_n)
    if COUNT:
        tl.store(steps_ptr + tl.program_id(0), steps)


@triton.jit
def _mixture_cdf_inverse_bwd_kernel(
    # pointers: cotangents, the inverse's solution, parameters, gradient outputs
    gx_ptr, gl_ptr, x_ptr, logit_ptr, loc_ptr, log_scale_ptr,
    g_y_ptr, g_logit_ptr, g_loc_ptr, g_log_scale_ptr,
    # element strides of the cotangents (1, or 0 for one value broadcast), then of each
    # parameter's (row, col, component) view
    s_gx, s_gl, s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
    # sizes: elements, columns (last dim of x), components
    N, C, K,
    # flags and block sizes
    KIND: tl.constexpr, OUTPUT: tl.constexpr, CDT: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x = tl.load(x_ptr + offs_n, mask=mask_n, other=0.0).to(CDT)
    finite = tl.abs(x) < float("inf")
    x = tl.where(finite, x, 0.0)
    cx = tl.where(finite, tl.load(gx_ptr + offs_n * s_gx, mask=mask_n, other=0.0).to(CDT), 0.0)
    cl = tl.where(finite, tl.load(gl_ptr + offs_n * s_gl, mask=mask_n, other=0.0).to(CDT), 0.0)
    log_pi, loc, log_scale, mask = load_mixture(
        logit_ptr, loc_ptr, log_scale_ptr, s_lr, s_lc, s_lk, s_mr, s_mc, s_mk, s_sr, s_sc, s_sk,
        offs_n, mask_n, C, K, BLOCK_K, CDT, DENSE, False,
    )
    _, lad = forward_eval(x, log_pi, loc, log_scale, KIND, OUTPUT, False)
    u, inv_s, r_cdf, r_sf, r_f, du_cdf, du_sf, du_pdf, log_F, log_S = vjp_terms(
        x, log_pi, loc, log_scale, KIND, OUTPUT, False
    )
    # d lad / dx of the forward: its VJP with cotangents (0, 1).
    c_cdf, c_sf, c_pdf = output_coefs(cx * 0.0, cx * 0.0 + 1.0, log_F, log_S, OUTPUT)
    dlad_dx, _, _, _ = vjp_assemble(
        c_cdf, c_sf, c_pdf, log_pi, u, inv_s, r_cdf, r_sf, r_f, du_cdf, du_sf, du_pdf
    )
    # Implicit differentiation: grad_y = w, grad_theta = forward VJP with cotangents (-w, -cl).
    w = tl.where(finite, (cx - cl * dlad_dx) * tl.exp(-lad), 0.0)
    c_cdf, c_sf, c_pdf = output_coefs(-w, -cl, log_F, log_S, OUTPUT)
    _, g_logit, g_loc, g_log_scale = vjp_assemble(
        c_cdf, c_sf, c_pdf, log_pi, u, inv_s, r_cdf, r_sf, r_f, du_cdf, du_sf, du_pdf
    )
    tl.store(g_y_ptr + offs_n, w, mask=mask_n)
    store_param_grads(g_logit_ptr, g_loc_ptr, g_log_scale_ptr, g_logit, g_loc, g_log_scale,
                       offs_n, mask, K, BLOCK_K, DENSE)


def mixture_cdf_inverse_fwd(
    y, logits, loc, log_scale, kind: str, output: str, max_steps: int, steps_out=None
):
    """Launch the inverse: (x, lad) in y's dtype, lad = log|dx/dy|. Each tile iterates until
    all its elements have converged (past ``max_steps`` iterations by bisection only, one per
    bit of the dtype at most); ``steps_out``, an int32
    tensor with one entry per program (:func:`num_programs`), receives those counts."""
    K = logits.shape[-1]
    x = torch.empty_like(y, memory_format=torch.contiguous_format)
    lad = torch.empty_like(x)
    N = y.numel()
    if N == 0:
        return x, lad
    y_flat, _, cols, views, strides = param_views(y, logits, loc, log_scale)
    block_n, block_k, mode = tile(views, LAUNCH, whole_rows=True)
    grid = cdiv(N, block_n)
    if steps_out is not None and steps_out.numel() < grid:
        raise ValueError(f"steps_out needs {grid} entries, has {steps_out.numel()}")
    _mixture_cdf_inverse_fwd_kernel[(grid,)](
        y_flat, *views, x, lad, x if steps_out is None else steps_out,
        *strides, N, cols, K,
        KIND=KINDS[kind], OUTPUT=OUTPUTS[output], CDT=tl_dtype(y.dtype),
        DENSE=mode,
        MAX_STEPS=max_steps, COUNT=steps_out is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=LAUNCH["num_warps"],
    )
    return x, lad


def num_programs(n: int, K: int, dense: bool = True) -> int:
    """Programs (tiles) the inverse launches for n elements with K components. Its threads
    hold whole elements on either path (DENSE 2 or 0), so ``dense`` does not change the
    count; it stays for callers that state the layout."""
    del dense
    return cdiv(n, tile_rows(K, LAUNCH, False))


def mixture_cdf_inverse_bwd(grad_x, grad_lad, x, logits, loc, log_scale, kind: str, output: str):
    """Launch the inverse's backward: grads to (y, logits, loc, log_scale), compute dtype."""
    K = logits.shape[-1]
    g_y, g_params = alloc_grads(x, K)
    N = x.numel()
    if N == 0:
        return [g_y, *g_params]
    x_flat, _, cols, views, strides = param_views(x, logits, loc, log_scale)
    (gx, s_gx), (gl, s_gl) = cotangent(grad_x), cotangent(grad_lad)
    block_n, block_k, mode = tile(views, LAUNCH)
    _mixture_cdf_inverse_bwd_kernel[(cdiv(N, block_n),)](
        gx, gl, x_flat, *views, g_y, *g_params,
        s_gx, s_gl, *strides, N, cols, K,
        KIND=KINDS[kind], OUTPUT=OUTPUTS[output], CDT=tl_dtype(x.dtype),
        DENSE=mode,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=LAUNCH["num_warps"],
    )
    return [g_y, *g_params]
