"""Functional API: the mixture-CDF transform, its inverse and the mixture density.

The mixture is ``F(x) = sum_k pi_k C((x - mu_k) / s_k)`` with ``pi = softmax(logits)``,
``s = exp(log_scale)`` and C the standard logistic or Gaussian CDF.

Shapes: ``x`` (or ``y``) has any shape ``S``; ``logits``, ``loc`` and ``log_scale`` each
broadcast to ``S + (K,)`` — per element ``(B, D, K)``, shared ``(D, K)``, or anything between —
and gradients of broadcast parameters are summed back to the parameter's shape. Any K >= 1.
float32 and float64 are computed in their own precision; float16 and bfloat16 are computed in
float32 and returned in the input dtype. Mixed floating dtypes are promoted.

Value checks follow torch.distributions: with ``validate_args`` on (the global default, see
:func:`set_validate_args`, or per call) NaN inputs, infinite inputs to the logit output,
non-finite parameters and targets outside the domain raise ValueError naming the argument;
this costs one host synchronisation. With it off nothing is checked on the device, and
out-of-domain values give NaN outputs. Checks are skipped while ``torch.compile`` traces and
inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ...). The checks themselves
are in :mod:`fastflow.checks`; the ops this module calls, in :mod:`fastflow.ops`.

MADE's building blocks (:func:`masked_linear` with a ``role``, :func:`made_head`,
:func:`autoregressive_solve`) are what :mod:`fastflow.nn`'s MADE flows run; where each runs is
decided in :mod:`fastflow.ops.dispatch`.
"""

from __future__ import annotations

import torch

from . import checks
from .checks import get_validate_args, set_validate_args
from .ops import autoregressive as _autoregressive
from .ops import blocked as _blocked
from .ops import dispatch
from .ops import made as _made
from .ops.core import call as _call
from .ops.mixture_cdf import apply_cdf, apply_log_prob
from .ops.mixture_inverse import apply_inverse

__all__ = ["autoregressive_solve", "fuses_head", "get_validate_args", "made_head",
           "masked_linear", "mixture_cdf", "mixture_cdf_inverse", "mixture_log_prob",
           "prefix_blocks", "prefix_plan_settings", "set_validate_args", "solves_in_one_pass"]


def mixture_cdf(
    x: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
    *, kind: str = "logistic", output: str = "unit", validate_args: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture-CDF transform and its log-derivative.

    Args:
        x: inputs, shape ``S``.
        logits, loc, log_scale: mixture parameters, each broadcasting to ``S + (K,)``.
        kind: ``"logistic"`` or ``"gaussian"`` components.
        output: ``"unit"``: y = F(x) in [0, 1], logabsdet = log f(x).
            ``"logit"``: y = logit F(x) = log F - log(1 - F), with 1 - F summed over the
            components rather than formed by subtraction (exact far into both tails; Flow++
            works in log space for this), and logabsdet = log|dy/dx| =
            log f - log F - log(1 - F), computed without cancellation.
        validate_args: override the global default for this call.

    Returns:
        ``(y, logabsdet)``, both of shape ``S`` in the (promoted) input dtype.
    """
    x, logits, loc, log_scale = checks.mixture_args("x", x, logits, loc, log_scale, kind, output)
    if checks.should_validate(validate_args):
        checks.validate_values([checks.input_check("x", x, output),
                                *checks.param_checks(logits, loc, log_scale)])
    return apply_cdf(x, logits, loc, log_scale, kind, output)


def mixture_cdf_inverse(
    y: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
    *, kind: str = "logistic", output: str = "unit", validate_args: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`mixture_cdf`, on a bracket from the components' own inverses: Newton
    (Halley in the Triton kernels) with bisection safeguards, run until each element has
    converged (the kernels stop a tile once all its elements have; past 44 iterations its
    remaining elements only bisect, in the floats' integer order, one iteration per bit).

    Args:
        y: targets in the forward's output space, shape ``S``: z in [0, 1] for ``"unit"``,
            any real for ``"logit"``.
        logits, loc, log_scale, kind, output: as for :func:`mixture_cdf`.
        validate_args: override the global default for this call.

    Returns:
        ``(x, logabsdet)`` of shape ``S`` with ``logabsdet = log|dx/dy|``. The targets
        z = 0 and z = 1 (y = -inf, +inf) give x = -inf and +inf with logabsdet = +inf and zero
        gradients. With validation off, targets outside the domain give NaN.
        Gradients come from implicit differentiation at the solution; higher derivatives
        from two differentiable Newton steps taken from it.
    """
    y, logits, loc, log_scale = checks.mixture_args("y", y, logits, loc, log_scale, kind, output)
    if checks.should_validate(validate_args):
        checks.validate_values([checks.target_check("y", y, output),
                                *checks.param_checks(logits, loc, log_scale)])
    return apply_inverse(y, logits, loc, log_scale, kind, output)


def mixture_log_prob(
    x: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
    *, kind: str = "logistic", validate_args: bool | None = None,
) -> torch.Tensor:
    """Log-density of the mixture, ``log sum_k pi_k c((x - mu_k)/s_k) / s_k``, shape ``S``.

    Arguments as for :func:`mixture_cdf`; this is the mixture density model of the lecture
    "Likelihood Models: Flow Models" (Berkeley CS294-158, Deep Unsupervised Learning) and
    computes only the density (no CDF).
    """
    x, logits, loc, log_scale = checks.mixture_args("x", x, logits, loc, log_scale, kind, None)
    if checks.should_validate(validate_args):
        checks.validate_values([("x", torch.isnan(x), "contains NaN"),
                                *checks.param_checks(logits, loc, log_scale)])
    return apply_log_prob(x, logits, loc, log_scale, kind)


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
    *, activation: str = "identity", role: str | None = None, blocks=None,
) -> torch.Tensor:
    """``act(x @ (weight * mask)^T + bias)``; on the "kernel" route (every product with
    ``role`` None on the Triton backend) the mask is applied in-kernel and all-zero mask
    tiles are skipped.

    Args:
        x: ``(..., K)``. weight, mask: ``(N, K)``; mask is 0/1 (any dtype). bias: ``(N,)``.
        activation: ``"identity"`` or ``"relu"`` (fused into the kernel's epilogue).
        role: None (the kernel wherever the backend is Triton, the dense product otherwise),
            or a MADE layer's ``"linear"`` / ``"head"``: the route
            :func:`fastflow.ops.dispatch.route` gives it ("dense", "blocks" or "kernel").
        blocks: for the "blocks" route, the mask's row blocks (:func:`prefix_blocks`) or a
            function returning them, called only on that route; None there means dense.

    Returns:
        ``(..., N)`` in x's dtype.
    """
    weight, bias = checks.masked_linear_args(x, weight, mask, bias, activation)
    grad = None
    if role is not None:
        checks.check_choice("role", role, dispatch.ROLES)
        grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    how = dispatch.route(x, role, grad)
    mask = mask.to(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    if how == "kernel":
        # Through ops.core.call: under torch.func transforms it applies the op's
        # autograd.Function, which the grad transforms accept (the op's own derivative they
        # refuse).
        y = _call("masked_linear_fwd", flat, weight, mask, bias, activation)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    if how == "blocks" and blocks is not None:
        blocks = blocks() if callable(blocks) else blocks
        if blocks is not None:
            y = _blocked.PrefixLinear.apply(flat, weight, mask, bias, blocks,
                                            activation == "relu")
            return y.reshape(*x.shape[:-1], weight.shape[0])
    # Plain PyTorch ops: autograd and torch.compile see through them, and a CPU step skips
    # the custom-op dispatch (about 3x the cost of a small layer).
    return _made.dense_masked_linear(x, weight, mask, bias, activation)


def prefix_blocks(mask: torch.Tensor):
    """The "blocks" route's row blocks ``((first row, end row, columns read), ...)`` for a
    degree-sorted prefix mask; None where the dense product is as cheap or the mask is not
    of that form. Depends on the mask and :data:`fastflow.ops.blocked.PLAN`."""
    limits = _blocked.prefix_limits(mask)
    return None if limits is None else _blocked.plan_blocks(limits, mask.shape[1])


def prefix_plan_settings() -> tuple:
    """The block planner's current settings (part of a cached plan's key)."""
    return tuple(_blocked.PLAN.values())


def made_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, limits: torch.Tensor,
              x: torch.Tensor, components: int, *, kind: str, output: str):
    """MADE's output layer fused with the mixture-CDF forward: ``(y, logabsdet)`` of x
    (M, D) under the mixtures whose (M, D, 3K) parameters ``h @ (weight * mask)^T + bias``
    gives, the mask from the head's per-row ``limits``, without writing the parameters.
    Differentiable in h, weight, bias and x; h, weight and bias are cast to x's dtype (as
    :func:`masked_linear` casts its weight)."""
    checks.check_kind_output(kind, output)
    h, weight, bias = (t if t.dtype == x.dtype else t.to(x.dtype) for t in (h, weight, bias))
    return _call("made_head_fwd", h, weight, bias, limits, x, components, kind, output)


def fuses_head(values: torch.Tensor, recorded, context: torch.Tensor | None = None) -> bool:
    """Whether a MADE flow's density pass on ``values`` (with ``context``) takes
    :func:`made_head` (see :func:`fastflow.ops.dispatch.head_fused`); ``recorded()`` says
    whether autograd records the pass."""
    return dispatch.head_fused(values, recorded, context)


def solves_in_one_pass(enabled: bool, recorded: bool) -> bool:
    """Whether a MADE flow's sequential direction takes :func:`autoregressive_solve` (see
    :func:`fastflow.ops.dispatch.solve_in_one_pass`)."""
    return dispatch.solve_in_one_pass(enabled, recorded)


def autoregressive_solve(values: torch.Tensor, plan: dict, components: int, *, kind: str,
                         output: str, invert: bool, residual: bool, activation="relu"):
    """A degree-sorted MADE flow's sequential direction in one pass, without gradients:
    ``invert=True`` solves x from targets z (MAF sampling), ``invert=False`` z from inputs
    x (IAF density). ``values`` (N, D); ``plan`` the MADE's ``sequential_plan``;
    ``activation`` "relu" or a callable. Returns ``(side, logabsdet)``, (N, D) each."""
    checks.check_kind_output(kind, output)
    return _autoregressive.solve(values, plan, components, kind, output, invert, residual,
                                 activation)
