"""Prefix-masked linear layers as a few dense products: MADE's "blocks" route.

A degree-sorted MADE's masks are prefix masks: row r is 1 on the columns j < limit[r] and 0
from there on, and the limits do not decrease down the rows (hidden units sorted by degree;
inputs and outputs in the natural order). Cut the rows into G blocks: block b's rows need only
the columns below its last row's limit, so its product is a dense ``x[:, :L_b] @ W[rows, :L_b]^T``
(the mask still multiplies the weight inside the block, where the rows' limits step). For
limits that rise evenly that is (1 + 1/G) / 2 of the dense product's multiply-adds, on the
same library GEMMs; the G - 1 extra products are what the block count trades against.
"""

from __future__ import annotations

import torch

# The plan's choices and cost model: the block counts tried; one more product costs
# "overhead" of the dense product's multiply-adds; a block reading fewer than "min_columns"
# columns costs as much as one reading that many (narrow GEMMs run below the library's rate).
# Fitted to CPU timings of MADE layers (docs/tuning.md); bench/investigations/tune_gpu.py sweeps it
# on a GPU.
PLAN = {"counts": (1, 2, 4, 8, 16), "overhead": 0.03, "min_columns": 64}
# Rows and columns of a block are cut at multiples of this (vector-friendly leading sizes).
ALIGN = 8


def prefix_limits(mask: torch.Tensor) -> torch.Tensor | None:
    """Per-row limits (int64, on the CPU) if ``mask`` (N, K) is a prefix mask with limits
    non-decreasing down the rows, else None."""
    nonzero = mask != 0
    limits = nonzero.sum(1)
    cols = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(nonzero, cols[None, :] < limits[:, None]):
        return None
    limits = limits.cpu()
    if limits.numel() > 1 and bool((limits[1:] < limits[:-1]).any()):
        return None
    return limits


def _align_up(n: int, cap: int) -> int:
    return min(cap, -(-n // ALIGN) * ALIGN)


def plan_blocks(limits: torch.Tensor, in_features: int) -> tuple[tuple[int, int, int], ...] | None:
    """Row blocks (r0, r1, L) covering every row, each reading columns [0, L): the candidate
    split (equal rows, cut at multiples of ALIGN) with the least modelled cost; None when that
    is the dense product itself (one block reading every column)."""
    n, k = limits.numel(), in_features
    floor = min(k, PLAN["min_columns"])
    best, best_cost = None, float("inf")
    for g in PLAN["counts"]:
        cuts = sorted({min(n, (round(i * n / g) // ALIGN) * ALIGN) for i in range(1, g)})
        bounds = [0, *(c for c in cuts if 0 < c < n), n]
        blocks = tuple((r0, r1, _align_up(int(limits[r1 - 1]), k))
                       for r0, r1 in zip(bounds[:-1], bounds[1:], strict=False))
        products = [b for b in blocks if b[2] > 0]
        cost = (sum((r1 - r0) * max(L, floor) for r0, r1, L in products)
                + PLAN["overhead"] * len(products) * n * k)
        if cost < best_cost:
            best, best_cost = blocks, cost
    return None if best == ((0, n, k),) else best


class PrefixLinear(torch.autograd.Function):
    """``act(x @ (W * mask)^T + b)`` for x (M, K), computed block by block (``plan_blocks``).

    Backward: the weight's gradient block by block, zero right of each block and masked; x's
    gradient by column segments: columns [L_{b-1}, L_b) are read by blocks b.. only, whose
    rows are contiguous, so each segment is one product and nothing accumulates. Where the
    backward is itself recorded (``create_graph=True``) or runs on batched gradients it is the
    dense product's, out of place, so that higher derivatives and batching rules see it.
    """

    @staticmethod
    def forward(ctx, x, weight, mask, bias, blocks, relu: bool):
        wm = weight * mask
        y = x.new_empty((x.shape[0], weight.shape[0]))
        for r0, r1, L in blocks:
            out = y[:, r0:r1]
            if L == 0:
                out.copy_(bias[r0:r1].expand_as(out)) if bias is not None else out.zero_()
            elif bias is not None:
                torch.addmm(bias[r0:r1], x[:, :L], wm[r0:r1, :L].t(), out=out)
            else:
                torch.mm(x[:, :L], wm[r0:r1, :L].t(), out=out)
        if relu:
            y.relu_()
        ctx.blocks, ctx.relu, ctx.has_bias = blocks, relu, bias is not None
        ctx.save_for_backward(x, weight, wm, mask, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, wm, mask, y = ctx.saved_tensors
        if ctx.relu:
            grad = grad * (y > 0)
        if torch.is_grad_enabled() or _batched(grad):
            return _recorded_backward(ctx, grad, x, weight, mask)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
            lo = 0
            for r0, _, L in ctx.blocks:
                if L > lo:
                    torch.mm(grad[:, r0:], wm[r0:, lo:L], out=grad_x[:, lo:L])
                    lo = L
            grad_x[:, lo:].zero_()
        if ctx.needs_input_grad[1]:
            grad_w = wm.new_empty(wm.shape)
            for r0, r1, L in ctx.blocks:
                if L > 0:
                    torch.mm(grad[:, r0:r1].t(), x[:, :L], out=grad_w[r0:r1, :L])
                grad_w[r0:r1, L:].zero_()
            grad_w.mul_(mask)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, None, grad_b, None, None


def _batched(grad) -> bool:
    """Whether the backward runs on a batch of gradients (``is_grads_batched=True``,
    ``jacobian(vectorize=True)``, torch.func), where products into ``out=`` views have no
    batching rule."""
    functorch = torch._C._functorch
    return functorch.is_legacy_batchedtensor(grad) or functorch.is_batchedtensor(grad)


def _recorded_backward(ctx, grad, x, weight, mask):
    """PrefixLinear's gradients as the dense product's, out of place: for autograd to record
    (create_graph=True) and for batched gradients."""
    need = ctx.needs_input_grad
    grad_x = grad @ (weight * mask) if need[0] else None
    grad_w = (grad.t() @ x) * mask if need[1] else None
    grad_b = grad.sum(0) if ctx.has_bias and need[3] else None
    return grad_x, grad_w, None, grad_b, None, None
