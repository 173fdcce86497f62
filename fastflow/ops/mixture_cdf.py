"""The mixture-CDF forward ops: ``fastflow::mixture_cdf_fwd`` (y and logabsdet) and
``fastflow::mixture_log_prob_fwd`` (the density alone), their backward ops, and the public
Functions :class:`MixtureCDF` and :class:`MixtureLogProb`.

Kernels: :mod:`fastflow.kernels.mixture_cdf`; CPU path: :mod:`fastflow.reference.mixture_cdf`;
oracle: :mod:`fastflow.reference.naive`. One backward per op (:func:`cdf_backward`,
:func:`log_prob_backward`) serves both the public Function and the derivative registered on
the op. Where the backward is itself recorded for a later derivative (:func:`.core.recorded`:
``create_graph=True`` with inputs that require grad, nested torch.func transforms, forward
mode) the gradients are taken instead by ``torch.func.vjp`` through the oracle's log-space
forward (:func:`cdf_map`, plain PyTorch, differentiable to any order); forward mode (``jvp``:
``jacfwd``, ``hessian``) goes through the same formulation.

The Functions are in the ``setup_context`` style with ``generate_vmap_rule``, so that
``vmap``, ``grad``, ``jacrev``, ``jacfwd`` and ``hessian`` apply; outside torch.func
transforms :func:`apply_cdf` and :func:`apply_log_prob` apply old-style twins of them
(:func:`.core.eager_twin`), which cost less host time per call.
"""

from __future__ import annotations

import torch

from ..checks import check_float_tensors, check_kind_output
from ..reference import mixture_cdf as cpu_path
from ..reference import naive
from . import dispatch
from .core import (
    call,
    compute_dtype,
    contiguous,
    eager,
    eager_twin,
    empty_contiguous,
    expand_params,
    fake_param_grads,
    func_jvp,
    func_vjp,
    grads_out,
    op,
    recorded,
    register_autograd,
    vmap_elementwise,
)


def _impl(t: torch.Tensor):
    """The forward and backward implementations for t's backend."""
    return dispatch.kernels("mixture_cdf") if dispatch.use_triton(t) else cpu_path


def cdf_map(kind: str, output: str):
    """(x, logits, loc, log_scale) -> (y, logabsdet) (or logabsdet alone for "density"),
    in the compute dtype, with the parameters broadcast inside (their gradients summed)."""
    def fn(x, logits, loc, log_scale):
        x, logits, loc, log_scale = naive.upcast(x, logits, loc, log_scale)
        y, lad = naive.forward(x, *expand_params(x, logits, loc, log_scale), kind, output)
        return lad if output == "density" else (y, lad)
    return fn


# --------------------------------------------------------------------------------------------
# mixture_cdf: forward map (y, logabsdet) and its VJP
# --------------------------------------------------------------------------------------------
@op("mixture_cdf_fwd")
def mixture_cdf_fwd(
    x: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
    kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_kind_output(kind, output)
    y, lad = _impl(x).mixture_cdf_fwd(x, logits, loc, log_scale, kind, output)
    return contiguous(y, lad)


@mixture_cdf_fwd.register_fake
def _(x, logits, loc, log_scale, kind, output):
    return empty_contiguous(x), empty_contiguous(x)


@op("mixture_cdf_bwd")
def mixture_cdf_bwd(
    grad_y: torch.Tensor, grad_lad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor,
    loc: torch.Tensor, log_scale: torch.Tensor, kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_kind_output(kind, output)
    g = _impl(x).mixture_cdf_bwd(grad_y, grad_lad, x, logits, loc, log_scale, kind, output)
    return contiguous(*g)


@mixture_cdf_bwd.register_fake
def _(grad_y, grad_lad, x, logits, loc, log_scale, kind, output):
    return (x.new_empty(x.shape, dtype=compute_dtype(x.dtype)), *fake_param_grads(x, logits))


# --------------------------------------------------------------------------------------------
# mixture_log_prob: the density alone (the forward kernel without the CDF)
# --------------------------------------------------------------------------------------------
@op("mixture_log_prob_fwd")
def mixture_log_prob_fwd(
    x: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, kind: str
) -> torch.Tensor:
    check_kind_output(kind)
    return _impl(x).mixture_cdf_fwd(x, logits, loc, log_scale, kind, "density")[1].contiguous()


@mixture_log_prob_fwd.register_fake
def _(x, logits, loc, log_scale, kind):
    return empty_contiguous(x)


@op("mixture_log_prob_bwd")
def mixture_log_prob_bwd(
    grad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor,
    log_scale: torch.Tensor, kind: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_kind_output(kind)
    g = _impl(x).mixture_cdf_bwd(None, grad, x, logits, loc, log_scale, kind, "density")
    return contiguous(*g)


@mixture_log_prob_bwd.register_fake
def _(grad, x, logits, loc, log_scale, kind):
    return (x.new_empty(x.shape, dtype=compute_dtype(x.dtype)), *fake_param_grads(x, logits))


# --------------------------------------------------------------------------------------------
# The one backward of each op, and the public Functions
# --------------------------------------------------------------------------------------------
def cdf_backward(ctx, grad_y, grad_lad, inputs, needs):
    x, logits, loc, log_scale = inputs
    if recorded(inputs, (grad_y, grad_lad)):
        return func_vjp(cdf_map(ctx.kind, ctx.output), inputs, (grad_y, grad_lad), needs)
    grads = call("mixture_cdf_bwd", grad_y, grad_lad, x,
                 *expand_params(x, logits, loc, log_scale), ctx.kind, ctx.output)
    return grads_out(grads, inputs, needs)


def log_prob_backward(ctx, grad, inputs, needs):
    x, logits, loc, log_scale = inputs
    if recorded(inputs, (grad,)):
        return func_vjp(cdf_map(ctx.kind, "density"), inputs, (grad,), needs)
    grads = call("mixture_log_prob_bwd", grad, x,
                 *expand_params(x, logits, loc, log_scale), ctx.kind)
    return grads_out(grads, inputs, needs)


class MixtureCDF(torch.autograd.Function):
    """(y, logabsdet) = mixture CDF of x; see :func:`fastflow.mixture_cdf`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, logits, loc, log_scale, kind: str, output: str):
        check_float_tensors("x", x, logits, loc, log_scale)
        return call("mixture_cdf_fwd", x, *expand_params(x, logits, loc, log_scale), kind,
                    output)

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
        grads = cdf_backward(ctx, grad_y, grad_lad, ctx.saved_tensors, ctx.needs_input_grad[:4])
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
        check_float_tensors("x", x, logits, loc, log_scale)
        return call("mixture_log_prob_fwd", x, *expand_params(x, logits, loc, log_scale), kind)

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
        grads = log_prob_backward(ctx, grad, ctx.saved_tensors, ctx.needs_input_grad[:4])
        return (*grads, None)

    @staticmethod
    def jvp(ctx, t_x, t_logits, t_loc, t_log_scale, _kind):
        return func_jvp(cdf_map(ctx.kind, "density"), ctx.saved_tensors,
                        (t_x, t_logits, t_loc, t_log_scale), ctx.out_dtypes)


_MixtureCDFEager = eager_twin(MixtureCDF)
_MixtureLogProbEager = eager_twin(MixtureLogProb)


def apply_cdf(*args):
    """:class:`MixtureCDF` applied (through its old-style twin outside torch.func)."""
    return (_MixtureCDFEager if eager() else MixtureCDF).apply(*args)


def apply_log_prob(*args):
    """:class:`MixtureLogProb` applied (through its old-style twin outside torch.func)."""
    return (_MixtureLogProbEager if eager() else MixtureLogProb).apply(*args)


# The same backwards registered on the forward ops themselves.
def _setup_saving_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.kind = inputs[4]
    ctx.output = inputs[5] if len(inputs) > 5 else None


def _cdf_fwd_backward(ctx, grad_y, grad_lad):
    return (*cdf_backward(ctx, grad_y, grad_lad, ctx.saved_tensors, (True,) * 4), None, None)


def _log_prob_fwd_backward(ctx, grad):
    return (*log_prob_backward(ctx, grad, ctx.saved_tensors, (True,) * 4), None)


register_autograd(
    "mixture_cdf_fwd", _cdf_fwd_backward, _setup_saving_inputs,
    lambda out, x, logits, loc, log_scale, kind, output:
        cdf_map(kind, output)(x, logits, loc, log_scale))
register_autograd(
    "mixture_log_prob_fwd", _log_prob_fwd_backward, _setup_saving_inputs,
    lambda out, x, logits, loc, log_scale, kind:
        cdf_map(kind, "density")(x, logits, loc, log_scale))
for _name in ("mixture_cdf_fwd", "mixture_cdf_bwd", "mixture_log_prob_fwd",
              "mixture_log_prob_bwd"):
    vmap_elementwise(_name)
