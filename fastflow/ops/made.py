"""MADE's ops: ``fastflow::masked_linear_fwd`` (``act(x @ (W * M)^T + b)``, all-zero mask tiles
skipped in the kernel) and ``fastflow::made_head_fwd`` (the MADE output layer fused with the
mixture-CDF forward: the (B, D, 3K) parameters never reach memory), with their derivatives and
batching rules.

Kernels: :mod:`fastflow.kernels.made`; CPU path and oracle: :mod:`fastflow.reference.made`.
The "blocks" route of masked_linear (library GEMMs over row blocks) is :mod:`.blocked`.
"""

from __future__ import annotations

import torch

from ..reference import made as cpu_path
from . import dispatch
from .core import (
    call,
    contiguous,
    empty_contiguous,
    func_vjp,
    op,
    recorded,
    register_autograd,
    vmap_rows,
)
from .mixture_cdf import cdf_map


def dense_masked_linear(x, weight, mask, bias, activation: str) -> torch.Tensor:
    """The "dense" route: one library GEMM with the masked weight, in plain PyTorch (autograd
    and torch.compile see through it)."""
    return cpu_path.masked_linear_fwd(x, weight, mask, bias, activation)


@op("masked_linear_fwd", autocast="lower")
def masked_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    if dispatch.use_triton(x):
        return dispatch.kernels("made").masked_linear_fwd(x, weight, mask, bias, activation)
    return cpu_path.masked_linear_fwd(x, weight, mask, bias, activation).contiguous()


@masked_linear_fwd.register_fake
def _(x, weight, mask, bias, activation):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _masked_linear_setup(ctx, inputs, output):
    x, weight, mask, bias, activation = inputs
    ctx.save_for_backward(x, weight, mask, output)
    ctx.has_bias, ctx.activation = bias is not None, activation


def _masked_linear_backward(ctx, grad):
    """Plain matmuls: cuBLAS does the backward well; the mask zeroes the weight grads."""
    x, weight, mask, y = ctx.saved_tensors
    if ctx.activation == "relu":
        grad = grad * (y > 0)
    grad_x = grad @ (weight * mask)
    grad_w = (grad.transpose(0, 1) @ x) * mask
    grad_b = grad.sum(0) if ctx.has_bias else None
    return grad_x, grad_w, None, grad_b, None


register_autograd("masked_linear_fwd", _masked_linear_backward, _masked_linear_setup,
                  lambda out, *args: cpu_path.masked_linear_fwd(*args))


# --------------------------------------------------------------------------------------------
# made_head: the MADE output layer fused with the mixture-CDF forward
# --------------------------------------------------------------------------------------------
@op("made_head_fwd")
def made_head_fwd(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, limits: torch.Tensor,
    x: torch.Tensor, components: int, kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if dispatch.use_triton(x):
        return dispatch.kernels("made").made_head_fwd(h, weight, bias, limits, x, components,
                                                      kind, output)
    y, lad = cpu_path.made_head_fwd(h, weight, bias, limits, x, components, kind, output)
    return contiguous(y, lad)


@made_head_fwd.register_fake
def _(h, weight, bias, limits, x, components, kind, output):
    return empty_contiguous(x), empty_contiguous(x)


def _made_head_setup(ctx, inputs, output):
    h, weight, bias, limits, x, components, kind, out = inputs
    ctx.save_for_backward(h, weight, bias, limits, x)
    ctx.components, ctx.kind, ctx.output = components, kind, out


def _made_head_backward(ctx, grad_y, grad_lad):
    """Recompute the parameters (one matmul), take the mixture-CDF VJP, then the layer's.
    Where the backward itself is recorded (:func:`recorded`), by ``torch.func.vjp`` through
    the parameters and the log-space forward instead (differentiable to any order)."""
    h, weight, bias, limits, x = ctx.saved_tensors
    K = ctx.components
    if recorded((h, weight, bias, x), (grad_y, grad_lad)):
        def head(h, weight, bias, x):
            return _made_head_differentiable(None, h, weight, bias, limits, x, K, ctx.kind,
                                             ctx.output)

        g_h, g_w, g_b, g_x = func_vjp(head, (h, weight, bias, x), (grad_y, grad_lad),
                                       (True,) * 4)
        return g_h, g_w, g_b, None, g_x, None, None, None
    params = cpu_path.made_head_params(h, weight, bias, limits, K)
    g_x, *g_params = call("mixture_cdf_bwd", grad_y, grad_lad, x, *params, ctx.kind,
                          ctx.output)
    g_out = torch.cat(g_params, dim=-1).reshape(h.shape[0], -1).to(h.dtype)
    mask = cpu_path.head_mask(limits, K, h.shape[1]).to(weight.dtype)
    grad_h = g_out @ (weight * mask)
    grad_w = (g_out.transpose(0, 1) @ h) * mask
    return grad_h, grad_w, g_out.sum(0), None, g_x.to(x.dtype), None, None, None


def _made_head_differentiable(out, h, weight, bias, limits, x, components, kind, output):
    params = cpu_path.made_head_params(h, weight, bias, limits, components)
    return cdf_map(kind, output)(x, *params)


register_autograd("made_head_fwd", _made_head_backward, _made_head_setup,
                  _made_head_differentiable)
vmap_rows("masked_linear_fwd", (0,))
vmap_rows("made_head_fwd", (0, 4))
