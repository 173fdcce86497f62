"""Public torch.autograd.Function subclasses over the registered ops.

Each Function takes x of shape S and parameters that broadcast to S + (K,). Forward expands the
parameters (views, no copies) and calls the registered forward op; backward calls the
registered backward op and reduces the per-element parameter gradients, in float32 or float64,
back to each parameter's own shape. The same backward formulas are registered on the forward
ops with ``torch.library.register_autograd``, so the ops are differentiable on their own too.
"""

from __future__ import annotations

import torch

from . import _registry


def _expand(x: torch.Tensor, *params: torch.Tensor):
    full = (*x.shape, params[0].shape[-1])
    return [p.expand(full) for p in params]


def _reduce(grad: torch.Tensor | None, like: torch.Tensor, needed: bool):
    """Sum a per-element grad over broadcast dimensions (in its float32/64) and cast."""
    if grad is None or not needed:
        return None
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)


def _grads_out(grads, inputs, needs):
    return tuple(_reduce(g, t, n) for g, t, n in zip(grads, inputs, needs, strict=True))


class MixtureCDF(torch.autograd.Function):
    """(y, logabsdet) = mixture CDF of x; see :func:`fastflow.mixture_cdf`."""

    @staticmethod
    def forward(ctx, x, logits, loc, log_scale, kind: str, output: str):
        y, lad = _registry.call("mixture_cdf_fwd", x, *_expand(x, logits, loc, log_scale),
                                kind, output)
        ctx.save_for_backward(x, logits, loc, log_scale)
        ctx.kind, ctx.output = kind, output
        return y, lad

    @staticmethod
    def backward(ctx, grad_y, grad_lad):
        x, logits, loc, log_scale = ctx.saved_tensors
        grads = _registry.call(
            "mixture_cdf_bwd", grad_y, grad_lad, x, *_expand(x, logits, loc, log_scale), ctx.kind,
            ctx.output)
        inputs = (x, logits, loc, log_scale)
        return (*_grads_out(grads, inputs, ctx.needs_input_grad[:4]), None, None)


class MixtureLogProb(torch.autograd.Function):
    """log p(x) of the mixture density; see :func:`fastflow.mixture_log_prob`."""

    @staticmethod
    def forward(ctx, x, logits, loc, log_scale, kind: str):
        log_p = _registry.call("mixture_log_prob_fwd", x, *_expand(x, logits, loc, log_scale),
                               kind)
        ctx.save_for_backward(x, logits, loc, log_scale)
        ctx.kind = kind
        return log_p

    @staticmethod
    def backward(ctx, grad):
        x, logits, loc, log_scale = ctx.saved_tensors
        grads = _registry.call("mixture_log_prob_bwd", grad, x,
                               *_expand(x, logits, loc, log_scale), ctx.kind)
        inputs = (x, logits, loc, log_scale)
        return (*_grads_out(grads, inputs, ctx.needs_input_grad[:4]), None)


class MixtureCDFInverse(torch.autograd.Function):
    """(x, logabsdet) = inverse mixture CDF of y; see :func:`fastflow.mixture_cdf_inverse`.

    Saves the solution x (not the target) and differentiates implicitly at it.
    """

    @staticmethod
    def forward(ctx, y, logits, loc, log_scale, kind: str, output: str):
        x, lad = _registry.call("mixture_cdf_inverse_fwd", y,
                                *_expand(y, logits, loc, log_scale), kind, output)
        ctx.save_for_backward(x, y, logits, loc, log_scale)
        ctx.kind, ctx.output = kind, output
        return x, lad

    @staticmethod
    def backward(ctx, grad_x, grad_lad):
        x, y, logits, loc, log_scale = ctx.saved_tensors
        grads = _registry.call(
            "mixture_cdf_inverse_bwd", grad_x, grad_lad, x, *_expand(x, logits, loc, log_scale),
            ctx.kind, ctx.output)
        inputs = (y, logits, loc, log_scale)
        return (*_grads_out(grads, inputs, ctx.needs_input_grad[:4]), None, None)


# --------------------------------------------------------------------------------------------
# The same backward formulas registered on the forward ops themselves.
# --------------------------------------------------------------------------------------------
def _setup_saving_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.kind = inputs[4]
    ctx.output = inputs[5] if len(inputs) > 5 else None


def _cdf_fwd_backward(ctx, grad_y, grad_lad):
    grads = _registry.call("mixture_cdf_bwd", grad_y, grad_lad, *ctx.saved_tensors, ctx.kind,
                           ctx.output)
    return (*_grads_out(grads, ctx.saved_tensors, (True,) * 4), None, None)


def _log_prob_fwd_backward(ctx, grad):
    grads = _registry.call("mixture_log_prob_bwd", grad, *ctx.saved_tensors, ctx.kind)
    return (*_grads_out(grads, ctx.saved_tensors, (True,) * 4), None)


def _inverse_setup(ctx, inputs, output):
    y, logits, loc, log_scale, kind, out = inputs
    ctx.save_for_backward(output[0], y, logits, loc, log_scale)
    ctx.kind, ctx.output = kind, out


def _inverse_fwd_backward(ctx, grad_x, grad_lad):
    x, y, *params = ctx.saved_tensors
    grads = _registry.call("mixture_cdf_inverse_bwd", grad_x, grad_lad, x, *params, ctx.kind,
                           ctx.output)
    return (*_grads_out(grads, (y, *params), (True,) * 4), None, None)


torch.library.register_autograd(
    "fastflow::mixture_cdf_fwd", _cdf_fwd_backward, setup_context=_setup_saving_inputs
)
torch.library.register_autograd(
    "fastflow::mixture_log_prob_fwd", _log_prob_fwd_backward, setup_context=_setup_saving_inputs
)
torch.library.register_autograd(
    "fastflow::mixture_cdf_inverse_fwd", _inverse_fwd_backward, setup_context=_inverse_setup
)

__all__ = ["MixtureCDF", "MixtureCDFInverse", "MixtureLogProb"]
