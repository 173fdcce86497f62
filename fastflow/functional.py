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
inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ...).
"""

from __future__ import annotations

import torch

from . import _registry, reference
from ._registry import KINDS, OUTPUTS, backend_for
from ._registry import check_choice as _check_choice
from .autograd import apply_cdf, apply_inverse, apply_log_prob

_PARAM_NAMES = ("logits", "loc", "log_scale")

_validate_default = True


def set_validate_args(value: bool) -> None:
    """Set the global default of ``validate_args`` (initially True, as torch.distributions)."""
    global _validate_default
    if not isinstance(value, bool):
        raise ValueError(f"validate_args must be a bool, got {value!r}")
    _validate_default = value


def get_validate_args() -> bool:
    """The global default of ``validate_args``."""
    return _validate_default


def _broadcasts_to(shape, full) -> bool:
    """Whether ``shape`` broadcasts to exactly ``full`` (plain Python: torch.broadcast_shapes
    cost more host time than the rest of an op's checks)."""
    if len(shape) > len(full):
        return False
    return all(s == f or s == 1 for s, f in zip(reversed(shape), reversed(full), strict=False))


def _prepare(x_name: str, x, logits, loc, log_scale, kind, output):
    """Check types, devices, shapes and choices; promote to one floating dtype."""
    _check_choice("kind", kind, KINDS)
    if output is not None:
        _check_choice("output", output, OUTPUTS)
    named = {x_name: x, "logits": logits, "loc": loc, "log_scale": log_scale}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
    for name in _PARAM_NAMES:
        if named[name].dim() == 0:
            raise ValueError(f"{name} must have a trailing component dimension K, got a scalar")
    K = logits.shape[-1]
    if K < 1:
        raise ValueError("logits must have at least one component (K >= 1), got K = 0")
    full = (*x.shape, K)
    for name in _PARAM_NAMES:
        p = named[name]
        if p.shape[-1] != K:
            raise ValueError(
                f"{name} has {p.shape[-1]} components but logits has {K}: all parameters "
                "must share the trailing dimension K"
            )
        if not _broadcasts_to(p.shape, full):
            raise ValueError(
                f"{name} of shape {tuple(p.shape)} does not broadcast to "
                f"{x_name}.shape + (K,) = {full}"
            )
    dtype = x.dtype
    if not (logits.dtype == loc.dtype == log_scale.dtype == dtype):
        for p in (logits, loc, log_scale):
            dtype = torch.promote_types(dtype, p.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in (x, logits, loc, log_scale)]


def _validate_values(checks: list[tuple[str, torch.Tensor, str]]) -> None:
    """Raise ValueError for the first (name, bad-mask, what) whose mask has a True; one sync."""
    flags = torch.stack([bad.any() for _, bad, _ in checks]).tolist()
    for (name, _, what), flag in zip(checks, flags, strict=True):
        if flag:
            raise ValueError(f"{name} {what}")


def _should_validate(validate_args: bool | None) -> bool:
    """Whether to run the value checks: on (per call or by default), and neither traced by
    torch.compile nor inside a torch.func transform (vmap, grad, jacrev, ...), where the
    checks' host synchronisation has no value to read (a batched tensor has no storage)."""
    on = _validate_default if validate_args is None else validate_args
    return (bool(on) and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


def _input_check(name: str, x: torch.Tensor, output: str | None):
    """The (name, bad-mask, what) check of a forward's inputs: no NaN, and for the logit
    output nothing infinite either (its logabsdet has no value at x = +-inf)."""
    if output == "logit":
        return (name, ~torch.isfinite(x),
                "must be finite for output='logit' (found inf or NaN)")
    return name, torch.isnan(x), "contains NaN"


def _target_check(name: str, y: torch.Tensor, output: str):
    """The (name, bad-mask, what) check of an inverse's targets."""
    if output == "unit":
        return (name, ~((y >= 0) & (y <= 1)),
                "must lie in [0, 1] for output='unit' (found values outside, or NaN)")
    return name, torch.isnan(y), "contains NaN"


def _param_checks(logits, loc, log_scale):
    return [(name, ~torch.isfinite(p), "must be finite")
            for name, p in zip(_PARAM_NAMES, (logits, loc, log_scale), strict=True)]


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
    x, logits, loc, log_scale = _prepare("x", x, logits, loc, log_scale, kind, output)
    if _should_validate(validate_args):
        _validate_values([_input_check("x", x, output), *_param_checks(logits, loc, log_scale)])
    return apply_cdf(x, logits, loc, log_scale, kind, output)


def mixture_cdf_inverse(
    y: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
    *, kind: str = "logistic", output: str = "unit", validate_args: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`mixture_cdf`, on a bracket from the components' own inverses: Newton
    (Halley in the Triton kernels) with bisection safeguards, run until each element has
    converged (the kernels stop a tile once all its elements have, at most 44 iterations).

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
    y, logits, loc, log_scale = _prepare("y", y, logits, loc, log_scale, kind, output)
    if _should_validate(validate_args):
        _validate_values([_target_check("y", y, output), *_param_checks(logits, loc, log_scale)])
    return apply_inverse(y, logits, loc, log_scale, kind, output)


def mixture_log_prob(
    x: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
    *, kind: str = "logistic", validate_args: bool | None = None,
) -> torch.Tensor:
    """Log-density of the mixture, ``log sum_k pi_k c((x - mu_k)/s_k) / s_k``, shape ``S``.

    Arguments as for :func:`mixture_cdf`; this is the mixture density model of the course
    notes "Likelihood Models: Flow Models" and computes only the density (no CDF).
    """
    x, logits, loc, log_scale = _prepare("x", x, logits, loc, log_scale, kind, None)
    if _should_validate(validate_args):
        _validate_values([("x", torch.isnan(x), "contains NaN"),
                          *_param_checks(logits, loc, log_scale)])
    return apply_log_prob(x, logits, loc, log_scale, kind)


_ACTIVATIONS = ("identity", "relu")


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
    *, activation: str = "identity",
) -> torch.Tensor:
    """``act(x @ (weight * mask)^T + bias)``; on a GPU the mask is applied in-kernel and
    all-zero mask tiles are skipped.

    Args:
        x: ``(..., K)``. weight, mask: ``(N, K)``; mask is 0/1 (any dtype). bias: ``(N,)``.
        activation: ``"identity"`` or ``"relu"`` (fused into the kernel's epilogue).

    Returns:
        ``(..., N)`` in x's dtype.
    """
    _check_choice("activation", activation, _ACTIVATIONS)
    named = {"x": x, "weight": weight, "mask": mask}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name in ("x", "weight") + (("bias",) if bias is not None else ()):
        if not named[name].is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {named[name].dtype}")
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise ValueError(f"weight must be (N, K) and mask the same shape; got weight "
                         f"{tuple(weight.shape)}, mask {tuple(mask.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must end in K = {weight.shape[1]} features, got {tuple(x.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    dtype = x.dtype
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if backend_for(x) == "reference":
        # Plain PyTorch ops: autograd and torch.compile see through them, and a CPU step skips
        # the custom-op dispatch (about 3x the cost of a small layer).
        return reference.masked_linear_fwd(x, weight, mask.to(dtype), bias, activation)
    flat = x.reshape(-1, x.shape[-1])
    # Through _registry.call: under torch.func transforms it applies the op's
    # autograd.Function, which the grad transforms accept (the op's own derivative they refuse).
    y = _registry.call("masked_linear_fwd", flat, weight, mask.to(dtype), bias, activation)
    return y.reshape(*x.shape[:-1], weight.shape[0])
