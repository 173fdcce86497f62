"""One-pass solve of a degree-sorted MADE's sequential direction: one launch, D steps.

Each program owns BLOCK_B batch rows and runs the whole loop for them (docs/design.md, MADE
degrees and the one-pass solve; the algorithm and the plan's tensors are described in
``fastflow/reference/autoregressive.py``, the oracle for this kernel). Step t computes the
units of degree t of every hidden layer — a few rows of each weight, streamed from L2, against
the already computed prefix of the layer below, through tl.dot — then the 3K mixture
parameters of the dimension with degree t + 1, then its transform (the safeguarded Halley
inverse, or the forward map) in registers.

Activations live in a per-row scratch buffer ``[solved values in degree order | layer 0 |
layer 1 | ...]`` written and re-read by the same program (L2-resident at these sizes); a
barrier after each step's stores makes them visible to the whole program.
"""

import torch
import triton
import triton.language as tl

from .device import forward_eval, head_params
from .launch import KINDS, OUTPUTS, cdiv, next_pow2, tl_dtype
from .solve import solve, target_logit

# Launch parameters on a GPU (bench/investigations/tune_gpu.py sweeps them): rows per program (at
# most), the hidden units and the input columns of one tl.dot tile, warps per program.
LAUNCH = {"block_b": 16, "block_n": 16, "block_h": 32, "num_warps": 4}


@triton.jit
def _autoregressive_solve_kernel(
    # pointers: values, outputs (result, logabsdet), scratch, packed hidden weights and biases,
    # per-layer metadata, degree table, order, output weight and bias
    v_ptr, r_ptr, lad_ptr, scr_ptr, w_ptr, b_ptr, meta_ptr, table_ptr, order_ptr,
    wo_ptr, bo_ptr,
    # strides: values (row, col), scratch row, bias row, output-bias row (0: shared)
    s_vb, s_vd, s_sb, s_bb, s_ob,
    # sizes: rows, dimensions, hidden layers, components, last hidden width
    B, D, L, K, H_last,
    # flags, the inverse's iteration cap and block sizes
    KIND: tl.constexpr, OUTPUT: tl.constexpr, INVERT: tl.constexpr, RESIDUAL: tl.constexpr,
    CDT: tl.constexpr, IEEE: tl.constexpr,
    MAX_STEPS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows = scr_ptr + offs_b[:, None] * s_sb
    bias_rows = b_ptr + offs_b[:, None] * s_bb
    T1 = D + 1
    last = tl.load(meta_ptr + 4 * (L - 1) + 3)  # scratch column of the last hidden layer
    for t in range(0, D):
        for layer in range(0, L):
            # meta: weight offset, weight row length, input and output columns in scratch
            w_off = tl.load(meta_ptr + 4 * layer)
            width = tl.load(meta_ptr + 4 * layer + 1)
            col_in = tl.load(meta_ptr + 4 * layer + 2)
            col_out = tl.load(meta_ptr + 4 * layer + 3)
            start = tl.load(table_ptr + (layer + 1) * T1 + t)
            end = tl.load(table_ptr + (layer + 1) * T1 + t + 1)
            seen = tl.load(table_ptr + layer * T1 + t + 1)
            for n0 in range(start, end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < end
                acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=CDT)
                for k0 in range(0, seen, BLOCK_H):
                    offs_k = k0 + tl.arange(0, BLOCK_H)
                    mask_k = offs_k < seen
                    a = tl.load(rows + col_in + offs_k[None, :],
                                mask=mask_b[:, None] & mask_k[None, :], other=0.0)
                    w = tl.load(w_ptr + w_off + offs_n[:, None] * width + offs_k[None, :],
                                mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                    if IEEE:
                        acc += tl.dot(a, tl.trans(w), input_precision="ieee")
                    else:
                        acc += tl.dot(a, tl.trans(w))
                out_mask = mask_b[:, None] & mask_n[None, :]
                acc += tl.load(bias_rows + (col_out - D) + offs_n[None, :], mask=out_mask,
                               other=0.0)
                acc = tl.where(acc < 0.0, 0.0, acc)  # ReLU that keeps NaN, as torch.relu
                if RESIDUAL:
                    if layer > 0:
                        acc += tl.load(rows + col_in + offs_n[None, :], mask=out_mask,
                                       other=0.0)
                tl.store(rows + col_out + offs_n[None, :], acc, mask=out_mask)
            tl.debug_barrier()
        col = tl.load(order_ptr + t).to(tl.int64)
        lim = tl.load(table_ptr + L * T1 + t + 1)
        log_pi, loc, log_scale, mask = head_params(
            scr_ptr + last, s_sb, 1, wo_ptr, H_last, 1, bo_ptr, s_ob, offs_b, mask_b, col, lim,
            K, CDT, IEEE, BLOCK_B, BLOCK_H, BLOCK_K, True,
        )
        v = tl.load(v_ptr + offs_b * s_vb + col * s_vd, mask=mask_b, other=0.5).to(CDT)
        if INVERT:
            r, lad, _ = solve(target_logit(v, OUTPUT), log_pi, loc, log_scale, mask, mask_b,
                               KIND, OUTPUT, MAX_STEPS, True)
        else:
            r, lad = forward_eval(v, log_pi, loc, log_scale, KIND, OUTPUT, True)
        tl.store(scr_ptr + offs_b * s_sb + t, r, mask=mask_b)
        tl.store(r_ptr + offs_b * D + col, r, mask=mask_b)
        tl.store(lad_ptr + offs_b * D + col, lad, mask=mask_b)
        tl.debug_barrier()


def autoregressive_solve(values, weights, biases, table, order, out_weight, out_bias,
                         components: int, kind: str, output: str, invert: bool,
                         residual: bool, activation: str,
                         max_steps: int = 44):
    """Launch the one-pass solve (ReLU networks): arguments as the reference's
    ``autoregressive_solve``. Returns (result, logabsdet), each (B, D) in values' dtype."""
    if activation != "relu":
        raise ValueError(f"the kernel supports activation='relu' only, got {activation!r}")
    B, D = values.shape
    cdt = torch.float64 if values.dtype == torch.float64 else torch.float32
    result = torch.empty((B, D), dtype=values.dtype, device=values.device)
    lad = torch.empty_like(result)
    if B == 0:
        return result, lad
    dev = values.device
    widths = [w.shape[0] for w in weights]
    # Per layer: offset of its weight in the packed buffer, its row length, the scratch
    # columns of its input and of its output.
    meta, w_off, col = [], 0, D
    for w in weights:
        meta += [w_off, w.shape[1], col - w.shape[1], col]
        w_off += w.numel()
        col += w.shape[0]
    w_packed = torch.cat([w.to(cdt).reshape(-1) for w in weights])
    per_row = any(b.dim() == 2 for b in biases)
    b_packed = torch.cat([b.to(cdt).expand(B, -1) if per_row else b.to(cdt)[None, :]
                          for b in biases], dim=1)
    out_bias = out_bias.to(cdt)
    out_bias = out_bias[None, :] if out_bias.dim() == 1 else out_bias.contiguous()
    scratch = torch.empty((B, col), dtype=cdt, device=dev)
    block_b = max(16, min(LAUNCH["block_b"], next_pow2(B)))
    _autoregressive_solve_kernel[(cdiv(B, block_b),)](
        values, result, lad, scratch, w_packed, b_packed,
        torch.tensor(meta, dtype=torch.int64, device=dev),
        table.to(device=dev, dtype=torch.int32).contiguous(),
        order.to(device=dev, dtype=torch.int32).contiguous(),
        out_weight.to(cdt).contiguous(), out_bias,
        values.stride(0), values.stride(1), scratch.stride(0),
        b_packed.stride(0) if per_row else 0, out_bias.stride(0) if out_bias.shape[0] > 1 else 0,
        B, D, len(weights), components, widths[-1],
        KIND=KINDS[kind], OUTPUT=OUTPUTS[output], INVERT=invert, RESIDUAL=residual,
        CDT=tl_dtype(values.dtype),
        IEEE=cdt == torch.float64 or not torch.backends.cuda.matmul.allow_tf32,
        MAX_STEPS=max_steps,
        BLOCK_B=block_b, BLOCK_N=LAUNCH["block_n"], BLOCK_H=LAUNCH["block_h"],
        BLOCK_K=max(16, next_pow2(components)), num_warps=LAUNCH["num_warps"],
    )
    return result, lad
