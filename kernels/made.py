"""MADE kernels: the masked linear layer and the fused output head.

Masked linear layer: y = act(x @ (W * M)^T + b) with the mask applied in-kernel.

MADE keeps hidden units sorted by degree, so its masks are block-triangular: whole
(BLOCK_N x BLOCK_K) tiles of the mask are zero. The host marks the tiles that have any nonzero
entry (a small int8 table per mask and block size) and the kernel skips the rest without
loading them: about half the FLOPs and weight traffic of a dense layer.

Fused head: the last hidden layer goes straight to the mixture-CDF outputs (y, logabsdet) of
every dimension; the (B, D, 3K) parameters live only in registers.
"""

import torch
import triton
import triton.language as tl

from .device import forward_eval, head_params
from .launch import KINDS, OUTPUTS, cdiv, next_pow2, tl_dtype

ACTIVATIONS = {"identity": 0, "relu": 1}


@triton.jit
def _masked_linear_fwd_kernel(
    # pointers: input, weight, mask, bias, nonzero-tile table, output
    x_ptr, w_ptr, m_ptr, b_ptr, tiles_ptr, y_ptr,
    # strides
    s_xm, s_xk, s_wn, s_wk, s_mn, s_mk, s_ym, s_yn, s_tn, s_tk,
    # sizes: rows, output features, input features
    M, N, K,
    # flags and block sizes
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if tl.load(tiles_ptr + pid_n * s_tn + kt * s_tk) != 0:
            offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wk = mask_n[:, None] & mask_k[None, :]
            w = tl.load(w_ptr + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk,
                        mask=wk, other=0.0)
            m = tl.load(m_ptr + offs_n[:, None] * s_mn + offs_k[None, :] * s_mk,
                        mask=wk, other=0)
            w = tl.where(m != 0, w, 0.0).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    if ACT == 1:
        acc = tl.where(acc < 0.0, 0.0, acc)  # ReLU that keeps NaN, as torch.relu
    tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :] * s_yn, acc,
             mask=mask_m[:, None] & mask_n[None, :])


def nonzero_tiles(mask: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """int8 table (ceil(N / block_n), ceil(K / block_k)): 1 where the mask tile has a nonzero."""
    n, k = mask.shape
    tn, tk = cdiv(n, block_n), cdiv(k, block_k)
    padded = torch.zeros(tn * block_n, tk * block_k, dtype=torch.bool, device=mask.device)
    padded[:n, :k] = mask != 0
    return padded.reshape(tn, block_n, tk, block_k).any(dim=(1, 3)).to(torch.int8)


# Launch parameters on a GPU (bench/investigations/tune_gpu.py sweeps them): the masked linear's
# largest (BLOCK_M, BLOCK_N, BLOCK_K) and warps; the fused head's largest BLOCK_B and BLOCK_H and
# warps.
LAUNCH = {"linear_blocks": (64, 64, 64), "linear_warps": 4,
          "head_block_b": 64, "head_block_h": 64, "head_warps": 4}


def block_sizes(M: int, N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K), at least 16 (tl.dot's minimum), at most LAUNCH's."""
    def fit(n, most):
        return max(16, min(most, next_pow2(n)))

    return tuple(fit(n, most) for n, most in zip((M, N, K), LAUNCH["linear_blocks"], strict=True))


def masked_linear_fwd(x, weight, mask, bias, activation: str, tiles=None):
    """Launch: x (M, K), weight and mask (N, K), bias (N,) or None -> (M, N) in x's dtype.

    ``tiles`` overrides the nonzero-tile table (tests use it to see that skipped tiles are
    really skipped).
    """
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads it with unit stride (a slice, a broadcast)
    block_m, block_n, block_k = block_sizes(M, N, K)
    if tiles is None:
        tiles = nonzero_tiles(mask, block_n, block_k)
    grid = (cdiv(M, block_m), cdiv(N, block_n))
    ieee = x.dtype in (torch.float32, torch.float64) and not torch.backends.cuda.matmul.allow_tf32
    _masked_linear_fwd_kernel[grid](
        x, weight, mask, y if bias is None else bias, tiles, y,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        mask.stride(0), mask.stride(1), y.stride(0), y.stride(1),
        tiles.stride(0), tiles.stride(1),
        M, N, K,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], IEEE=ieee,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=LAUNCH["linear_warps"],
    )
    return y


# --------------------------------------------------------------------------------------------
# Fused MADE output head: last hidden layer -> mixture parameters -> (y, logabsdet)
# --------------------------------------------------------------------------------------------
@triton.jit
def _made_head_fwd_kernel(
    # pointers: last hidden layer, output weight, output bias, per-dimension hidden prefix
    # lengths, the flow's input, outputs
    h_ptr, w_ptr, b_ptr, lim_ptr, x_ptr, y_ptr, lad_ptr,
    # strides
    s_hb, s_hh, s_wo, s_wh, s_xb, s_xd,
    # sizes: rows, dimensions, hidden units, components
    B, D, H, K,
    # flags and block sizes
    KIND: tl.constexpr, OUTPUT: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    lim = tl.load(lim_ptr + d)
    log_pi, loc, log_scale, mask = head_params(
        h_ptr, s_hb, s_hh, w_ptr, s_wo, s_wh, b_ptr, 0, offs_b, mask_b, d, lim, K,
        CDT, IEEE, BLOCK_B, BLOCK_H, BLOCK_K, True,
    )
    x = tl.load(x_ptr + offs_b * s_xb + d * s_xd, mask=mask_b, other=0.0).to(CDT)
    y, lad = forward_eval(x, log_pi, loc, log_scale, KIND, OUTPUT, True)
    tl.store(y_ptr + offs_b * D + d, y, mask=mask_b)
    tl.store(lad_ptr + offs_b * D + d, lad, mask=mask_b)


def made_head_fwd(h, weight, bias, limits, x, components: int, kind: str, output: str):
    """Launch the fused head: h (B, H), weight (3KD, H), bias (3KD,), limits (D,) int32 (the
    hidden prefix each dimension sees), x (B, D) -> (y, lad), each (B, D) in x's dtype."""
    B, D = x.shape
    y = torch.empty((B, D), dtype=x.dtype, device=x.device)
    lad = torch.empty_like(y)
    if B == 0:
        return y, lad
    bias = bias.contiguous()  # the kernel reads it with unit stride (a slice, a broadcast)
    H = h.shape[1]
    block_k = max(16, next_pow2(components))
    block_b = max(16, min(LAUNCH["head_block_b"], next_pow2(B)))
    block_h = max(16, min(LAUNCH["head_block_h"], next_pow2(H)))
    ieee = x.dtype in (torch.float32, torch.float64) and not torch.backends.cuda.matmul.allow_tf32
    _made_head_fwd_kernel[(cdiv(B, block_b), D)](
        h, weight, bias, limits, x, y, lad,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
        B, D, H, components,
        KIND=KINDS[kind], OUTPUT=OUTPUTS[output], CDT=tl_dtype(x.dtype), IEEE=ieee,
        BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=LAUNCH["head_warps"],
    )
    return y, lad
