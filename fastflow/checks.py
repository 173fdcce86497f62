"""fastflow's input checks, in one place: argument choices, types, devices and shapes (always
checked, on the host) and value checks (NaN, infinities, domains), modelled on
torch.distributions' ``validate_args`` but switched on their own: torch's
``Distribution.set_default_validate_args`` does not change them.

Value checks run when ``validate_args`` is on (the global default, :func:`set_validate_args`,
or per call) and cost one host synchronisation per call. They are skipped while
``torch.compile`` traces and inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``,
...), where a batched tensor has no value to read.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

KINDS = ("logistic", "gaussian")
OUTPUTS = ("unit", "logit")
ACTIVATIONS = ("identity", "relu")
PARAM_NAMES = ("logits", "loc", "log_scale")

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


def should_validate(validate_args: bool | None = None) -> bool:
    """Whether to run the value checks: on (per call or by default), and neither traced by
    torch.compile nor inside a torch.func transform."""
    if validate_args is None:
        on = _validate_default
    elif isinstance(validate_args, bool):
        on = validate_args
    else:
        raise ValueError(f"validate_args must be a bool or None, got {validate_args!r}")
    return (on and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


def check_choice(name: str, value, choices) -> None:
    """ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_count(name: str, value, least: int = 1) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an integer (not a
    bool) of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return int(value)


def check_seed(seed) -> int | None:
    """None, or an int seed (not a bool); a ValueError naming ``seed`` otherwise."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    return None if seed is None else int(seed)


def check_optional_count(name: str, value) -> int | None:
    """None, or an int >= 1 (:func:`check_count`)."""
    return None if value is None else check_count(name, value)


def check_real(name: str, value) -> float:
    """``value`` as a float, or a ValueError naming ``name`` unless it is a real number (not a
    bool, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def as_size(n) -> int | None:
    """n as a non-negative int where it is one (a Python, numpy or 0-d tensor integer; not a
    bool), else None."""
    if isinstance(n, bool):
        return None
    try:
        n = operator.index(n)
    except TypeError:
        return None
    return n if n >= 0 else None


def sample_shape(name: str, value) -> tuple[int, ...]:
    """A sample shape as a tuple of sizes: a non-negative integer, or a sequence of them (as
    torch.Size takes); a ValueError naming ``name`` otherwise."""
    n = as_size(value)
    if n is not None:
        return (n,)
    try:
        sizes = tuple(torch.Size(value))
    except (TypeError, ValueError):
        sizes = None
    if sizes is None or any(s < 0 for s in sizes):
        raise ValueError(f"{name} must be a non-negative int or a sequence of them, got "
                         f"{value!r}")
    return sizes


def check_positive_real(name: str, value) -> float:
    """``value`` as a float, or a ValueError naming ``name`` unless it is a finite real number
    above 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def hidden_sizes(name: str, value, allow_empty: bool = False) -> list[int]:
    """Hidden layer sizes as a list of ints >= 1: a sequence of them, or one int for one
    layer; a ValueError naming ``name`` otherwise."""
    sizes = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) \
        else value
    try:
        sizes = list(sizes)
    except TypeError:
        sizes = None
    if (sizes is None or (not sizes and not allow_empty)
            or any(isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1
                   for h in sizes)):
        raise ValueError(f"{name} must be positive sizes (a sequence of ints >= 1, or one "
                         f"int), got {value!r}")
    return [int(h) for h in sizes]


def check_kind_output(kind, output=None) -> None:
    """The ops branch on these strings: an unknown one must raise, not fall through to
    another formula (the public autograd Functions and torch.ops.fastflow reach them)."""
    check_choice("kind", kind, KINDS)
    if output is not None:
        check_choice("output", output, OUTPUTS)


def check_float_tensor(x, name: str) -> None:
    """ValueError naming ``name`` unless x is a floating-point torch.Tensor."""
    if not isinstance(x, torch.Tensor):
        kind = type(x)
        raise ValueError(f"{name} must be a torch.Tensor, got {kind.__module__}."
                         f"{kind.__qualname__} (convert it with torch.as_tensor)")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_float_tensors(x_name: str, x, logits, loc, log_scale) -> None:
    """The public Functions' own check (they skip the functional API's): floating-point
    tensors only, so that integers never reach a backend that would truncate."""
    for name, t in ((x_name, x), ("logits", logits), ("loc", loc), ("log_scale", log_scale)):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            check_float_tensor(t, name)


def _broadcasts_to(shape, full) -> bool:
    """Whether ``shape`` broadcasts to exactly ``full`` (plain Python: torch.broadcast_shapes
    cost more host time than the rest of an op's checks)."""
    if len(shape) > len(full):
        return False
    return all(s == f or s == 1 for s, f in zip(reversed(shape), reversed(full), strict=False))


def mixture_args(x_name: str, x, logits, loc, log_scale, kind, output):
    """Check a mixture op's types, devices, shapes and choices; promote to one floating
    dtype. Returns ``[x, logits, loc, log_scale]``."""
    check_kind_output(kind, output)
    named = {x_name: x, "logits": logits, "loc": loc, "log_scale": log_scale}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
    for name in PARAM_NAMES:
        if named[name].dim() == 0:
            raise ValueError(f"{name} must have a trailing component dimension K, got a scalar")
    K = logits.shape[-1]
    if K < 1:
        raise ValueError("logits must have at least one component (K >= 1), got K = 0")
    full = (*x.shape, K)
    for name in PARAM_NAMES:
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


def masked_linear_args(x, weight, mask, bias, activation):
    """Check masked_linear's arguments; weight and bias cast to x's dtype. Returns
    ``(weight, bias)``."""
    check_choice("activation", activation, ACTIVATIONS)
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
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def validate_values(checks: list[tuple[str, torch.Tensor, str]]) -> None:
    """Raise ValueError for the first (name, bad-mask, what) whose mask has a True; one sync.
    Meta tensors hold no values: nothing to check (shapes were checked already)."""
    if not checks or checks[0][1].device.type == "meta":
        return
    flags = torch.stack([bad.any() for _, bad, _ in checks]).tolist()
    for (name, _, what), flag in zip(checks, flags, strict=True):
        if flag:
            raise ValueError(f"{name} {what}")


def input_check(name: str, x: torch.Tensor, output: str | None):
    """The (name, bad-mask, what) check of a forward's inputs: no NaN, and for the logit
    output nothing infinite either (its logabsdet has no value at x = +-inf)."""
    if output == "logit":
        return (name, ~torch.isfinite(x),
                "must be finite for output='logit' (found inf or NaN)")
    return name, torch.isnan(x), "contains NaN"


def target_check(name: str, y: torch.Tensor, output: str):
    """The (name, bad-mask, what) check of an inverse's targets."""
    if output == "unit":
        return (name, ~((y >= 0) & (y <= 1)),
                "must lie in [0, 1] for output='unit' (found values outside, or NaN)")
    return name, torch.isnan(y), "contains NaN"


def param_checks(logits, loc, log_scale):
    """The (name, bad-mask, what) checks of mixture parameters: finite."""
    return [(name, ~torch.isfinite(p), "must be finite")
            for name, p in zip(PARAM_NAMES, (logits, loc, log_scale), strict=True)]


def check_context(context, context_features, x):
    """ValueError for a missing, unexpected or wrongly shaped context, one that is not
    floating point, on another device than x, or (when validating) not finite. A floating
    context of another dtype is cast to x's by the network."""
    if context_features is None:
        if context is not None:
            raise ValueError("context was given but the model has no context_features")
        return
    if context is None:
        raise ValueError(f"context is required (context_features={context_features})")
    if context.shape != (*x.shape[:-1], context_features):
        raise ValueError(
            f"context must have shape {(*x.shape[:-1], context_features)}, "
            f"got {tuple(context.shape)}"
        )
    if not context.is_floating_point():
        raise ValueError(f"context must be a floating-point tensor, got {context.dtype}")
    if context.device != x.device:
        raise ValueError(f"context is on {context.device} but x is on {x.device}")
    if should_validate():
        validate_values([("context", ~torch.isfinite(context), "must be finite")])
