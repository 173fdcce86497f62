"""The mixture-CDF inverse: ``fastflow::mixture_cdf_inverse_fwd`` (x and logabsdet of the
inverse), its backward op, and the public Function :class:`MixtureCDFInverse`.

Kernels: :mod:`fastflow.kernels.mixture_inverse`; CPU path:
:mod:`fastflow.reference.mixture_inverse`; oracle:
:func:`fastflow.reference.naive.inverse_fixed`. The backward differentiates implicitly at the
solution; one backward (:func:`inverse_backward`) serves the Function and the op's registered
derivative. Where it is itself recorded (higher derivatives, forward mode) the gradients go
through two differentiable Newton steps from the solution (:func:`newton_inverse`).
"""

from __future__ import annotations

import torch

from ..checks import check_float_tensors, check_kind_output
from ..reference import mixture_inverse as cpu_path
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

# The inverse's iteration budget. The kernels iterate safeguarded Halley per tile until every
# element has converged; lanes still active after MAX_STEPS iterations (a compile-time
# constant: the worst case of the earlier fixed schedule) bisect in the floats' integer
# order, one more iteration per bit of the dtype at most. reference.naive's inverse_fixed runs
# that fixed schedule (BISECT_STEPS bisection, then NEWTON_STEPS Newton steps) and serves as a
# benchmark baseline; the CPU path iterates to convergence.
BISECT_STEPS = 40
NEWTON_STEPS = 4
MAX_STEPS = BISECT_STEPS + NEWTON_STEPS


def newton_inverse(x_star: torch.Tensor, kind: str, output: str):
    """(y, logits, loc, log_scale) -> (x, logabsdet) of the inverse, differentiable: two
    Newton steps x <- x - (g(x) - t) / g'(x) on g = logit F, from the solution x* (a
    constant), towards the target t = logit-space y.

    At the root Newton's map has zero derivative in x, so each step squares the error of its
    start as a function of (y, parameters): x2 agrees with the exact inverse to fourth order
    about the current point, and its derivatives up to the third are those of the inverse
    (the first are the implicit-function gradients). logabsdet = -(the forward's at x2) for
    the requested output. Elements whose solution is not finite (the boundary targets
    z = 0, 1, and NaN) get zero gradients, as in the first-order backward: they start at the
    location of their heaviest component, where g and g' are finite, with that point's own
    g as the target (a fixed point), so that no inf or NaN reaches a gradient.
    """
    def fn(y, logits, loc, log_scale):
        y, logits, loc, log_scale = naive.upcast(y, logits, loc, log_scale)
        logits, loc, log_scale = expand_params(y, logits, loc, log_scale)
        finite = torch.isfinite(x_star)
        with torch.no_grad():
            x_far = loc.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)
            x = torch.where(finite, x_star.to(y.dtype), x_far)
            t_far = naive.forward(x, logits, loc, log_scale, kind, "logit")[0]
        # The target, with y masked before the logit (its derivative is infinite at 0, 1).
        safe = torch.where(finite, y, 0.5 if output == "unit" else 0.0)
        t = torch.where(finite, naive.target_logit(safe, output), t_far)
        for _ in range(2):
            g, log_slope = naive.forward(x, logits, loc, log_scale, kind, "logit")
            x = x - (g - t) * torch.exp(-log_slope)
        lad = -naive.forward(x, logits, loc, log_scale, kind, output)[1]
        # Only derivatives are read from these outputs; at the boundary, the solver's values.
        return (torch.where(finite, x, x_star.to(x.dtype)),
                torch.where(finite, lad, torch.inf))
    return fn


# --------------------------------------------------------------------------------------------
# mixture_cdf_inverse: safeguarded Newton inverse and its implicit-differentiation VJP
# --------------------------------------------------------------------------------------------
@op("mixture_cdf_inverse_fwd")
def mixture_cdf_inverse_fwd(
    y: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
    kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_kind_output(kind, output)
    if dispatch.use_triton(y):
        x, lad = dispatch.kernels("mixture_inverse").mixture_cdf_inverse_fwd(
            y, logits, loc, log_scale, kind, output, MAX_STEPS
        )
    else:
        x, lad = cpu_path.mixture_cdf_inverse_fwd(y, logits, loc, log_scale, kind, output)
    return contiguous(x, lad)


@mixture_cdf_inverse_fwd.register_fake
def _(y, logits, loc, log_scale, kind, output):
    return empty_contiguous(y), empty_contiguous(y)


@op("mixture_cdf_inverse_bwd")
def mixture_cdf_inverse_bwd(
    grad_x: torch.Tensor, grad_lad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor,
    loc: torch.Tensor, log_scale: torch.Tensor, kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_kind_output(kind, output)
    impl = dispatch.kernels("mixture_inverse") if dispatch.use_triton(x) else cpu_path
    g = impl.mixture_cdf_inverse_bwd(grad_x, grad_lad, x, logits, loc, log_scale, kind, output)
    return contiguous(*g)


@mixture_cdf_inverse_bwd.register_fake
def _(grad_x, grad_lad, x, logits, loc, log_scale, kind, output):
    return (x.new_empty(x.shape, dtype=compute_dtype(x.dtype)), *fake_param_grads(x, logits))


def inverse_backward(ctx, grad_x, grad_lad, x, inputs, needs):
    """``inputs`` = (y, logits, loc, log_scale); x the forward's solution."""
    if recorded(inputs, (grad_x, grad_lad)):
        fn = newton_inverse(x, ctx.kind, ctx.output)
        return func_vjp(fn, inputs, (grad_x, grad_lad), needs)
    _, logits, loc, log_scale = inputs
    grads = call(
        "mixture_cdf_inverse_bwd", grad_x, grad_lad, x, *expand_params(x, logits, loc, log_scale),
        ctx.kind, ctx.output)
    return grads_out(grads, inputs, needs)


class MixtureCDFInverse(torch.autograd.Function):
    """(x, logabsdet) = inverse mixture CDF of y; see :func:`fastflow.mixture_cdf_inverse`.

    Saves the solution x (not only the target) and differentiates implicitly at it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(y, logits, loc, log_scale, kind: str, output: str):
        check_float_tensors("y", y, logits, loc, log_scale)
        return call("mixture_cdf_inverse_fwd", y, *expand_params(y, logits, loc, log_scale),
                    kind, output)

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
        grads = inverse_backward(ctx, grad_x, grad_lad, x, inputs, ctx.needs_input_grad[:4])
        return (*grads, None, None)

    @staticmethod
    def jvp(ctx, t_y, t_logits, t_loc, t_log_scale, _kind, _output):
        x, *inputs = ctx.saved_tensors
        return func_jvp(newton_inverse(x, ctx.kind, ctx.output), tuple(inputs),
                        (t_y, t_logits, t_loc, t_log_scale), ctx.out_dtypes)


_MixtureCDFInverseEager = eager_twin(MixtureCDFInverse)


def apply_inverse(*args):
    """:class:`MixtureCDFInverse` applied (through its old-style twin outside torch.func)."""
    return (_MixtureCDFInverseEager if eager() else MixtureCDFInverse).apply(*args)


# The same backward registered on the forward op itself.
def _inverse_setup(ctx, inputs, output):
    y, logits, loc, log_scale, kind, out = inputs
    ctx.save_for_backward(output[0], y, logits, loc, log_scale)
    ctx.kind, ctx.output = kind, out


def _inverse_fwd_backward(ctx, grad_x, grad_lad):
    x, *inputs = ctx.saved_tensors
    return (*inverse_backward(ctx, grad_x, grad_lad, x, inputs, (True,) * 4), None, None)


register_autograd(
    "mixture_cdf_inverse_fwd", _inverse_fwd_backward, _inverse_setup,
    lambda out, y, logits, loc, log_scale, kind, output:
        newton_inverse(out[0], kind, output)(y, logits, loc, log_scale))
for _name in ("mixture_cdf_inverse_fwd", "mixture_cdf_inverse_bwd"):
    vmap_elementwise(_name)
