"""Public torch.autograd.Function subclasses over the registered ops.

Each Function takes x of shape S and parameters that broadcast to S + (K,). Forward expands the
parameters (views, no copies) and calls the registered forward op; backward calls the
registered backward op and reduces the per-element parameter gradients, in float32 or float64,
back to each parameter's own shape. The same backward formulas are registered on the forward
ops with ``torch.library.register_autograd``, so the ops are differentiable on their own too.

torch.func. The Functions are in the ``setup_context`` style with ``generate_vmap_rule``, so
that ``vmap``, ``grad``, ``jacrev``, ``jacfwd`` and ``hessian`` apply: under ``vmap`` their
bodies run on batched tensors and reach the ops' batching rules (``_registry``), which run each
op once on the whole batch. The functional API applies old-style twins of them outside
torch.func transforms (:func:`apply_cdf` and friends), which cost less host time per call.

Higher derivatives. The backward ops compute first derivatives only. Where the backward is
itself recorded for a later derivative (``_registry.recorded``: ``create_graph=True`` with
inputs that require grad, nested torch.func transforms, forward mode), the gradients are
taken instead by ``torch.func.vjp`` through the oracle's log-space forward
(``reference.naive.forward``, plain PyTorch, differentiable to any order); the
inverse's through two differentiable Newton steps from its solution
(``_registry.newton_inverse``). The forward mode (``jvp``: ``jacfwd``, ``hessian``) goes
through the same formulations by ``torch.func.jvp``. The first-order backward, including
``grad``, ``vmap(grad)`` and ``jacrev`` alone, runs the backward ops as before.
"""

from __future__ import annotations

import torch

from . import _registry
from ._registry import cdf_map, func_jvp, func_vjp, newton_inverse
from ._registry import expand_params as _expand


def _reduce(grad: torch.Tensor | None, like: torch.Tensor, needed: bool):
    """Sum a per-element grad over broadcast dimensions (in its float32/64) and cast."""
    if grad is None or not needed:
        return None
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)


def _grads_out(grads, inputs, needs):
    return tuple(_reduce(g, t, n) for g, t, n in zip(grads, inputs, needs, strict=True))


# --------------------------------------------------------------------------------------------
# The Functions
# --------------------------------------------------------------------------------------------
def _cdf_backward(ctx, grad_y, grad_lad, inputs, needs):
    x, logits, loc, log_scale = inputs
    if _registry.recorded(inputs, (grad_y, grad_lad)):
        return func_vjp(cdf_map(ctx.kind, ctx.output), inputs, (grad_y, grad_lad), needs)
    grads = _registry.call("mixture_cdf_bwd", grad_y, grad_lad, x,
                           *_expand(x, logits, loc, log_scale), ctx.kind, ctx.output)
    return _grads_out(grads, inputs, needs)


def _log_prob_backward(ctx, grad, inputs, needs):
    x, logits, loc, log_scale = inputs
    if _registry.recorded(inputs, (grad,)):
        return func_vjp(cdf_map(ctx.kind, "density"), inputs, (grad,), needs)
    grads = _registry.call("mixture_log_prob_bwd", grad, x,
                           *_expand(x, logits, loc, log_scale), ctx.kind)
    return _grads_out(grads, inputs, needs)


def _inverse_backward(ctx, grad_x, grad_lad, x, inputs, needs):
    """``inputs`` = (y, logits, loc, log_scale); x the forward's solution."""
    if _registry.recorded(inputs, (grad_x, grad_lad)):
        fn = newton_inverse(x, ctx.kind, ctx.output)
        return func_vjp(fn, inputs, (grad_x, grad_lad), needs)
    _, logits, loc, log_scale = inputs
    grads = _registry.call(
        "mixture_cdf_inverse_bwd", grad_x, grad_lad, x, *_expand(x, logits, loc, log_scale),
        ctx.kind, ctx.output)
    return _grads_out(grads, inputs, needs)


class MixtureCDF(torch.autograd.Function):
    """(y, logabsdet) = mixture CDF of x; see :func:`fastflow.mixture_cdf`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, logits, loc, log_scale, kind: str, output: str):
        return _registry.call("mixture_cdf_fwd", x, *_expand(x, logits, loc, log_scale),
                              kind, output)

    @staticmethod
    def save(ctx, inputs, output):
        """What backward needs (jvp also reads ``out_dtypes``)."""
        x, logits, loc, log_scale, kind, out = inputs
        ctx.save_for_backward(x, logits, loc, log_scale)
        ctx.kind, ctx.output = kind, out
        ctx.out_dtypes = (output[0].dtype, output[1].dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        MixtureCDF.save(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    @staticmethod
    def backward(ctx, grad_y, grad_lad):
        grads = _cdf_backward(ctx, grad_y, grad_lad, ctx.saved_tensors,
                              ctx.needs_input_grad[:4])
        return (*grads, None, None)

    @staticmethod
    def jvp(ctx, t_x, t_logits, t_loc, t_log_scale, _kind, _output):
        return func_jvp(cdf_map(ctx.kind, ctx.output), ctx.saved_tensors,
                        (t_x, t_logits, t_loc, t_log_scale), ctx.out_dtypes)


class MixtureLogProb(torch.autograd.Function):
    """log p(x) of the mixture density; see :func:`fastflow.mixture_log_prob`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, logits, loc, log_scale, kind: str):
        return _registry.call("mixture_log_prob_fwd", x, *_expand(x, logits, loc, log_scale),
                              kind)

    @staticmethod
    def save(ctx, inputs, output):
        """What backward needs (jvp also reads ``out_dtypes``)."""
        x, logits, loc, log_scale, kind = inputs
        ctx.save_for_backward(x, logits, loc, log_scale)
        ctx.kind = kind
        ctx.out_dtypes = (output.dtype,)

    @staticmethod
    def setup_context(ctx, inputs, output):
        MixtureLogProb.save(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    @staticmethod
    def backward(ctx, grad):
        grads = _log_prob_backward(ctx, grad, ctx.saved_tensors, ctx.needs_input_grad[:4])
        return (*grads, None)

    @staticmethod
    def jvp(ctx, t_x, t_logits, t_loc, t_log_scale, _kind):
        return func_jvp(cdf_map(ctx.kind, "density"), ctx.saved_tensors,
                        (t_x, t_logits, t_loc, t_log_scale), ctx.out_dtypes)


class MixtureCDFInverse(torch.autograd.Function):
    """(x, logabsdet) = inverse mixture CDF of y; see :func:`fastflow.mixture_cdf_inverse`.

    Saves the solution x (not only the target) and differentiates implicitly at it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(y, logits, loc, log_scale, kind: str, output: str):
        return _registry.call("mixture_cdf_inverse_fwd", y,
                              *_expand(y, logits, loc, log_scale), kind, output)

    @staticmethod
    def save(ctx, inputs, output):
        """What backward needs (jvp also reads ``out_dtypes``)."""
        y, logits, loc, log_scale, kind, out = inputs
        ctx.save_for_backward(output[0], y, logits, loc, log_scale)
        ctx.kind, ctx.output = kind, out
        ctx.out_dtypes = (output[0].dtype, output[1].dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        MixtureCDFInverse.save(ctx, inputs, output)
        ctx.save_for_forward(output[0], *inputs[:4])

    @staticmethod
    def backward(ctx, grad_x, grad_lad):
        x, *inputs = ctx.saved_tensors
        grads = _inverse_backward(ctx, grad_x, grad_lad, x, inputs, ctx.needs_input_grad[:4])
        return (*grads, None, None)

    @staticmethod
    def jvp(ctx, t_y, t_logits, t_loc, t_log_scale, _kind, _output):
        x, *inputs = ctx.saved_tensors
        return func_jvp(newton_inverse(x, ctx.kind, ctx.output), tuple(inputs),
                        (t_y, t_logits, t_loc, t_log_scale), ctx.out_dtypes)


def _eager_twin(fn: type) -> type:
    """The Function ``fn`` in the old style (forward taking ctx), with the same forward,
    saved state and backward, applied outside torch.func transforms.

    ``autograd.Function.apply`` binds the arguments of a setup_context-style Function to
    its forward's signature (``inspect.signature``) on every call, about 20 us of host time
    on a 2-core CPU, as much as the rest of a small op's host overhead; the old style skips
    that, but the torch.func transforms accept only the setup_context style. Without ``jvp``
    (forward mode goes through ``fn``), which torch.compile does not trace.
    """
    def forward(ctx, *args):
        output = fn.forward(*args)
        fn.save(ctx, args, output)
        return output

    return type(f"{fn.__name__}Eager", (torch.autograd.Function,), {
        "__doc__": f"{fn.__name__} in the old style, for calls outside torch.func transforms.",
        "forward": staticmethod(forward),
        "backward": staticmethod(fn.backward),
    })


_MixtureCDFEager = _eager_twin(MixtureCDF)
_MixtureLogProbEager = _eager_twin(MixtureLogProb)
_MixtureCDFInverseEager = _eager_twin(MixtureCDFInverse)


def _eager() -> bool:
    """Whether to apply the old-style twins: outside torch.func transforms and forward-mode
    AD, and while torch.compile traces (which takes either style, but no custom jvp)."""
    return torch.compiler.is_compiling() or not (
        torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0)


def apply_cdf(*args):
    """:class:`MixtureCDF` applied (through its old-style twin outside torch.func)."""
    return (_MixtureCDFEager if _eager() else MixtureCDF).apply(*args)


def apply_log_prob(*args):
    """:class:`MixtureLogProb` applied (through its old-style twin outside torch.func)."""
    return (_MixtureLogProbEager if _eager() else MixtureLogProb).apply(*args)


def apply_inverse(*args):
    """:class:`MixtureCDFInverse` applied (through its old-style twin outside torch.func)."""
    return (_MixtureCDFInverseEager if _eager() else MixtureCDFInverse).apply(*args)


# --------------------------------------------------------------------------------------------
# The same backward formulas registered on the forward ops themselves.
# --------------------------------------------------------------------------------------------
def _setup_saving_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.kind = inputs[4]
    ctx.output = inputs[5] if len(inputs) > 5 else None


def _cdf_fwd_backward(ctx, grad_y, grad_lad):
    return (*_cdf_backward(ctx, grad_y, grad_lad, ctx.saved_tensors, (True,) * 4), None, None)


def _log_prob_fwd_backward(ctx, grad):
    return (*_log_prob_backward(ctx, grad, ctx.saved_tensors, (True,) * 4), None)


def _inverse_setup(ctx, inputs, output):
    y, logits, loc, log_scale, kind, out = inputs
    ctx.save_for_backward(output[0], y, logits, loc, log_scale)
    ctx.kind, ctx.output = kind, out


def _inverse_fwd_backward(ctx, grad_x, grad_lad):
    x, *inputs = ctx.saved_tensors
    return (*_inverse_backward(ctx, grad_x, grad_lad, x, inputs, (True,) * 4), None, None)


_registry.register_autograd(
    "mixture_cdf_fwd", _cdf_fwd_backward, _setup_saving_inputs,
    lambda out, x, logits, loc, log_scale, kind, output:
        cdf_map(kind, output)(x, logits, loc, log_scale))
_registry.register_autograd(
    "mixture_log_prob_fwd", _log_prob_fwd_backward, _setup_saving_inputs,
    lambda out, x, logits, loc, log_scale, kind:
        cdf_map(kind, "density")(x, logits, loc, log_scale))
_registry.register_autograd(
    "mixture_cdf_inverse_fwd", _inverse_fwd_backward, _inverse_setup,
    lambda out, y, logits, loc, log_scale, kind, output:
        newton_inverse(out[0], kind, output)(y, logits, loc, log_scale))

__all__ = ["MixtureCDF", "MixtureCDFInverse", "MixtureLogProb"]
