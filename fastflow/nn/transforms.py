"""Invertible transforms on (..., D) tensors.

Every transform has ``forward(x, context=None) -> (z, logabsdet)`` and
``inverse(z, context=None) -> (x, logabsdet)`` with logabsdet of shape ``x.shape[:-1]``, summed
over the features. "forward" is the density direction (data to base).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import constraints

from .. import checks
from ..checks import check_float_tensor, check_kind_output
from ..functional import (
    autoregressive_solve,
    fuses_head,
    made_head,
    mixture_cdf,
    mixture_cdf_inverse,
    solves_in_one_pass,
)
from .made import MADE


class Transform(nn.Module):
    """Base class: checks the feature count and dtype of what it is given.

    ``domain`` and ``codomain`` are the ranges of the values the transform takes and gives
    (``constraints.real`` or ``constraints.unit_interval``, per feature); None where the
    transform keeps whatever range it is given (a permutation). :class:`~fastflow.nn.Flow`
    uses them to refuse a chain whose density would not be normalized.

    ``takes_context`` says whether the transform uses a context: None (unknown, the default
    for a subclass that does not say), True or False. A :class:`Flow` refuses a context when
    every transform says False.
    """

    features: int
    domain = None
    codomain = None
    takes_context: bool | None = None

    def _check(self, x: torch.Tensor, name: str = "x") -> None:
        check_float_tensor(x, name)
        if x.dim() < 1 or x.shape[-1] != self.features:
            raise ValueError(
                f"{name} must have {self.features} features in its last dimension, "
                f"got shape {tuple(x.shape)}"
            )

    def forward(self, x, context=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, z, context=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def as_transform(self, context=None, cache_size: int = 1) -> TorchTransform:
        """This transform as a ``torch.distributions.Transform`` (for
        ``TransformedDistribution``, pyro and the like), optionally with a fixed context.

        torch's transforms map base to data, so the adapter's call is this transform's
        :meth:`inverse` and its ``inv`` is :meth:`forward`; ``log_abs_det_jacobian`` is
        summed over the last axis (``event_dim = 1``)."""
        return TorchTransform(self, context, cache_size=cache_size)


def broadcast_context(context, x):
    """context expanded to x's leading shape where it broadcasts there (a view); else as
    given, for the transforms' shape check to name."""
    if context is None or not isinstance(x, torch.Tensor) or context.dim() == 0:
        return context
    lead = x.shape[:-1]
    if context.shape[:-1] == lead:
        return context
    try:
        if torch.broadcast_shapes(context.shape[:-1], lead) == lead:
            return context.expand(*lead, context.shape[-1])
    except RuntimeError:
        pass
    return context


def _vector(c):
    return constraints.independent(c if c is not None else constraints.real, 1)


class TorchTransform(torch.distributions.Transform):
    """A fastflow :class:`Transform` seen as a ``torch.distributions.Transform`` from the
    base space to the data space (see :meth:`Transform.as_transform`)."""

    bijective = True

    def __init__(self, transform: Transform, context=None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.transform, self.context = transform, context

    @property
    def domain(self):
        return _vector(self.transform.codomain)

    @property
    def codomain(self):
        return _vector(self.transform.domain)

    def _call(self, z):
        return self.transform.inverse(z, broadcast_context(self.context, z))[0]

    def _inverse(self, x):
        return self.transform(x, broadcast_context(self.context, x))[0]

    def log_abs_det_jacobian(self, z, x):
        """log|dx/dz| = -(the density direction's logabsdet at x), summed over features."""
        return -self.transform(x, broadcast_context(self.context, x))[1]

    def with_cache(self, cache_size: int = 1):
        if self._cache_size == cache_size:
            return self
        return TorchTransform(self.transform, self.context, cache_size=cache_size)

    def __eq__(self, other):
        return (isinstance(other, TorchTransform) and other.transform is self.transform
                and other.context is self.context)

    def __hash__(self):
        return hash((id(self.transform), id(self.context)))

    def __repr__(self):
        return f"TorchTransform({self.transform.__class__.__name__})"


class Compose(Transform):
    """Transforms applied in order (forward) and in reverse order (inverse)."""

    def __init__(self, transforms):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        if not self.transforms:
            raise ValueError("transforms must not be empty")
        self.features = self.transforms[0].features
        for t in self.transforms:
            if t.features != self.features:
                raise ValueError(
                    f"all transforms must have the same features; got {t.features} and "
                    f"{self.features}"
                )

    @property
    def domain(self):
        return next((t.domain for t in self.transforms if t.domain is not None), None)

    @property
    def codomain(self):
        return next((t.codomain for t in reversed(self.transforms) if t.codomain is not None),
                    None)

    @property
    def takes_context(self):
        says = [t.takes_context for t in self.transforms]
        return True if True in says else (False if all(v is False for v in says) else None)

    def forward(self, x, context=None):
        return chain_forward(self.transforms, x, context)

    def inverse(self, z, context=None):
        return chain_inverse(self.transforms, z, context)


def _chain(steps, value, context):
    """Apply each step; logabsdets add up (the first is taken as it is: no 0 + lad kernel)."""
    total = None
    for step in steps:
        value, lad = step(value, context)
        total = lad if total is None else total + lad
    if total is None:
        raise ValueError("transforms must not be empty")
    return value, total


def chain_forward(transforms, x, context=None):
    """Apply transforms in order; logabsdets add up."""
    return _chain(transforms, x, context)


def chain_inverse(transforms, z, context=None):
    """Invert transforms in reverse order; logabsdets add up."""
    return _chain([t.inverse for t in reversed(transforms)], z, context)


class _MixtureTransform(Transform):
    """What the mixture-CDF transforms share: their ranges and their repr."""

    domain = constraints.real

    @property
    def codomain(self):
        return constraints.unit_interval if self.output == "unit" else constraints.real

    def extra_repr(self) -> str:
        return (f"features={self.features}, components={self.components}, "
                f"kind={self.kind!r}, output={self.output!r}")

    @property
    def takes_context(self) -> bool:
        return getattr(self, "context_features", None) is not None

    @staticmethod
    def _check_network(network: nn.Module) -> None:
        """A non-finite result from finite inputs is an overflow (a finite network fed values
        far outside the data) unless the network's own weights are not finite."""
        if not all(bool(torch.isfinite(p).all()) for p in network.parameters()):
            raise ValueError("the network's weights are not finite (did training diverge?)")

    def _finite_params(self, params, network: nn.Module):
        """(params, lost): elements whose mixture parameters overflowed get harmless
        parameters here and the value inf in the output (``_mark_lost``), which
        :class:`Flow` reads as a log-density of -inf; non-finite weights are an error."""
        lost = ~(torch.isfinite(params[0]) & torch.isfinite(params[1])
                 & torch.isfinite(params[2])).all(-1)
        if not bool(lost.any()):
            return params, None
        self._check_network(network)
        keep = lost.unsqueeze(-1)
        return [p.masked_fill(keep, 0.0) for p in params], lost

    @staticmethod
    def _mark_lost(out, lad, lost):
        if lost is None:
            return out, lad
        return out.masked_fill(lost, math.inf), lad.masked_fill(lost, 0.0)


class MixtureCDFFlow(_MixtureTransform):
    """The elementwise CDF flow: a learned K-component mixture per dimension.

    ``output="logit"`` (the default) maps to R^D in logit space, for a Gaussian (or other
    real-valued) base; ``"unit"`` maps to [0, 1]^D, for a Uniform base.
    """

    def __init__(self, features: int, components: int, kind: str = "logistic",
                 output: str = "logit"):
        super().__init__()
        features = checks.check_count("features", features)
        components = checks.check_count("components", components)
        check_kind_output(kind, output)
        self.features, self.components = features, components
        self.kind, self.output = kind, output
        self.logits = nn.Parameter(torch.zeros(features, components))
        self.loc = nn.Parameter(torch.linspace(-1.0, 1.0, components).repeat(features, 1))
        self.log_scale = nn.Parameter(torch.zeros(features, components))

    def _params(self):
        return self.logits, self.loc, self.log_scale

    def forward(self, x, context=None):
        self._check(x)
        z, lad = mixture_cdf(x, *self._params(), kind=self.kind, output=self.output)
        return z, lad.sum(-1)

    def inverse(self, z, context=None):
        self._check(z, "z")
        x, lad = mixture_cdf_inverse(z, *self._params(), kind=self.kind, output=self.output)
        return x, lad.sum(-1)


class AutoregressiveMixtureFlow(_MixtureTransform):
    """Masked autoregressive mixture-CDF flow: a MADE predicts each dimension's mixture.

    ``direction="maf"``: the MADE reads x; density (forward) in one pass, sampling (inverse)
    sequential over dimensions. ``direction="iaf"``: the MADE reads z; sampling in one pass,
    the density of external data sequential. With ``features=2`` this is the 2-D
    autoregressive flow. ``output`` as in :class:`MixtureCDFFlow` ("logit" by default, for a
    real-valued base).
    """

    def __init__(self, features: int, components: int, hidden_features, *,
                 kind: str = "logistic", direction: str = "maf", output: str = "logit",
                 context_features: int | None = None, order="natural",
                 residual: bool = False, hidden_degrees: str = "sequential",
                 seed: int | None = None):
        super().__init__()
        if direction not in ("maf", "iaf"):
            raise ValueError(f"direction must be 'maf' or 'iaf', got {direction!r}")
        features = checks.check_count("features", features)
        components = checks.check_count("components", components)
        check_kind_output(kind, output)
        self.features, self.components = features, components
        self.kind, self.direction, self.output = kind, direction, output
        self.context_features = context_features
        # False forces the D-pass route even without gradients (benchmarks, debugging).
        self.one_pass = True
        self.made = MADE(features, hidden_features, 3 * components, order=order,
                         hidden_degrees=hidden_degrees, residual=residual,
                         context_features=context_features, seed=seed)
        # The first dimension in the order sees no input: its mixture is the output bias
        # alone, whose default values put every location within 1/sqrt(fan_in) of 0. Spread
        # them over [-1, 1] as MixtureCDFFlow's are. The other dimensions' locations vary
        # with their inputs from the start; spreading their biases as well measured worse
        # (docs/tuning.md, "Initial locations").
        degrees = self.made.input_degrees
        if degrees.is_meta:  # built under torch.device("meta"): no values until loaded
            return
        with torch.no_grad():
            first = int(torch.argmin(degrees))
            bias = self.made.output.bias.view(features, 3 * components)
            bias[first, components:2 * components] = torch.linspace(-1.0, 1.0, components)

    def extra_repr(self) -> str:
        hidden = [layer.out_features for layer in self.made.layers]
        extra = "" if self.context_features is None else \
            f", context_features={self.context_features}"
        return (f"{super().extra_repr()}, hidden_features={hidden}, "
                f"direction={self.direction!r}{extra}")

    def _params(self, inputs, context):
        # One split rather than three slices: autograd then joins the three gradients with
        # one cat, where slices would each scatter theirs into a zeroed (..., 3K) tensor and
        # sum the three.
        return self.made(inputs, context).split(self.components, dim=-1)

    def _recorded(self, *tensors) -> bool:
        """Whether autograd records MADE's output for these inputs (the route's mode)."""
        return torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                            or any(p.requires_grad for p in self.parameters()))

    def _mixture_step(self, inputs, values, context, invert: bool):
        """(out, logabsdet) per dimension: one MADE pass on ``inputs`` gives every
        dimension's mixture, applied to ``values`` (its inverse for ``invert``)."""
        if not invert and fuses_head(values, lambda: self._recorded(inputs, values), context):
            return self._fused_forward(inputs, values)
        params = self._params(inputs, context)
        lost = None
        if checks.should_validate():
            params, lost = self._finite_params(params, self.made)
        op = mixture_cdf_inverse if invert else mixture_cdf
        out, lad = op(values, *params, kind=self.kind, output=self.output)
        return self._mark_lost(out, lad, lost)

    def _fused_forward(self, inputs, values):
        """MADE's output layer and the mixture CDF in one kernel: the (B, D, 3K) parameters
        are never written to memory."""
        if checks.should_validate():
            checks.validate_values([checks.input_check("x", values, self.output)])
        lead = values.shape[:-1]
        h = self.made.hidden(inputs).reshape(-1, self.made.output.in_features)
        out = self.made.output
        y, lad = made_head(h, out.weight, out.bias, self.made.head_limits,
                           values.reshape(-1, self.features), self.components, kind=self.kind,
                           output=self.output)
        return y.reshape(*lead, self.features), lad.reshape(*lead, self.features)

    def _sequential(self, values, context, invert: bool):
        """(side, logabsdet): solve for the MADE-side variable one degree at a time.

        Without gradients, one pass (each hidden unit computed once; a single Triton kernel
        on a GPU). With gradients, D network passes, so that autograd sees every dependence.
        """
        tracked = self._recorded(values, *(() if context is None else (context,)))
        if solves_in_one_pass(self.one_pass, tracked):
            return self._solve_in_one_pass(values, context, invert)
        side = torch.zeros_like(values)
        degrees = self.made.input_degrees
        for d in range(1, self.features + 1):
            new, _ = self._mixture_step(side, values, context, invert)
            side = torch.where(degrees == d, new, side)
        _, lad = self._mixture_step(side, values, context, invert)
        return side, lad

    def _solve_in_one_pass(self, values, context, invert: bool):
        lead = values.shape[:-1]
        flat = values.reshape(-1, self.features)
        if context is not None:
            context = context.reshape(-1, context.shape[-1]).to(values.dtype)
        act = self.made.activation
        side, lad = autoregressive_solve(
            flat, self.made.sequential_plan(context), self.components, kind=self.kind,
            output=self.output, invert=invert, residual=self.made.residual,
            activation="relu" if type(act) is nn.ReLU else act)
        if checks.should_validate():
            # After the solve. The parameters exist only inside it: a NaN result from valid
            # input means they were not finite, an overflow of a finite network (those rows
            # are marked as the D-pass route marks them) or a diverged one (an error).
            name = "z" if invert else "x"
            checks.validate_values([checks.target_check(name, values, self.output) if invert
                                    else checks.input_check(name, values, self.output)])
            lost = (torch.isnan(side) | torch.isnan(lad)).any(-1, keepdim=True)
            if bool(lost.any()):
                self._check_network(self.made)
                side, lad = self._mark_lost(side, lad, lost)
        return side.reshape(*lead, self.features), lad.reshape(*lead, self.features)

    def forward(self, x, context=None):
        self._check(x)
        checks.check_context(context, self.context_features, x)
        if self.direction == "maf":
            z, lad = self._mixture_step(x, x, context, invert=False)
            return z, lad.sum(-1)
        z, lad = self._sequential(x, context, invert=False)
        return z, lad.sum(-1)

    def inverse(self, z, context=None):
        self._check(z, "z")
        checks.check_context(context, self.context_features, z)
        if self.direction == "iaf":
            x, lad = self._mixture_step(z, z, context, invert=True)
            return x, lad.sum(-1)
        x, lad = self._sequential(z, context, invert=True)
        return x, lad.sum(-1)


class Logit(Transform):
    """[0, 1]^D -> R^D: y = logit(alpha + (1 - 2 alpha) x), the usual squash for image data.

    With alpha > 0 the image is [logit(alpha), -logit(alpha)] (about +-13.8 for the default
    1e-6): the inverse clamps to it, so a flow's samples stay in [0, 1], and the base's mass
    outside that interval (of order alpha for a fitted flow) lands on the boundary; the
    density on [0, 1] then integrates to one minus that mass. alpha = 0 is the exact bijection
    onto R, for data strictly inside (0, 1)."""

    takes_context = False

    domain, codomain = constraints.unit_interval, constraints.real

    def __init__(self, features: int, alpha: float = 1e-6):
        super().__init__()
        alpha = checks.check_real("alpha", alpha)
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.features, self.alpha = checks.check_count("features", features), alpha

    def extra_repr(self) -> str:
        return f"features={self.features}, alpha={self.alpha}"

    def _logit(self, x, name):
        if checks.should_validate():
            # log of a negative number is a silent NaN: unscaled pixels (0..255) are the
            # usual cause.
            checks.validate_values([(name, ~((x >= 0) & (x <= 1)),
                                     "must lie in [0, 1] (found values outside, or NaN)")])
        # 1 - s formed as alpha + (1 - 2 alpha)(1 - x), not 1 - s: exact near x = 1 (where
        # 1 - x is), where log1p(-s) lost the digits s rounded away.
        s = self.alpha + (1 - 2 * self.alpha) * x
        log_s = torch.log(s)
        log_1ms = torch.log(self.alpha + (1 - 2 * self.alpha) * (1 - x))
        lad = math.log1p(-2 * self.alpha) - log_s - log_1ms
        return log_s - log_1ms, lad.sum(-1)

    def _sigmoid(self, y, clamp):
        # With alpha > 0 the logit's image is [logit(alpha), -logit(alpha)], not R. Sampling
        # (``clamp``) puts a y past it (a base sample in the mass outside the image) on that
        # end, so that samples stay in [0, 1], the support that log_prob accepts; the density
        # direction does not (x there has density 0, and the map stays one to one).
        if clamp and self.alpha > 0:
            end = math.log(self.alpha) - math.log1p(-self.alpha)
            y = y.clamp(end, -end)
        s = torch.sigmoid(y)
        lad = nn.functional.logsigmoid(y) + nn.functional.logsigmoid(-y) - math.log1p(
            -2 * self.alpha)
        x = (s - self.alpha) / (1 - 2 * self.alpha)
        return (x.clamp(0.0, 1.0) if clamp else x), lad.sum(-1)

    def forward(self, x, context=None):
        self._check(x)
        return self._logit(x, "x")

    def inverse(self, z, context=None):
        self._check(z, "z")
        return self._sigmoid(z, clamp=True)


class Sigmoid(Logit):
    """R^D -> [0, 1]^D: z = (sigmoid(x) - alpha) / (1 - 2 alpha), the inverse of
    :class:`Logit` with the same alpha. The default alpha = 0 is the exact bijection onto
    (0, 1), so every finite x has a finite density; with alpha > 0 the map reaches
    [-alpha', 1 + alpha'] and an x whose z leaves [0, 1] has density 0 (-inf log-density)."""

    domain, codomain = constraints.real, constraints.unit_interval

    def __init__(self, features: int, alpha: float = 0.0):
        super().__init__(features, alpha)

    def forward(self, x, context=None):
        self._check(x)
        return self._sigmoid(x, clamp=False)

    def inverse(self, z, context=None):
        self._check(z, "z")
        return self._logit(z, "z")


class Permutation(Transform):
    """Reorder the features: z = x[..., perm]."""

    takes_context = False

    def __init__(self, permutation):
        super().__init__()
        if isinstance(permutation, torch.Tensor) and permutation.is_meta:
            raise ValueError("permutation must hold values, got a tensor on the meta device")
        try:  # on the CPU even under torch.device("meta"): it is checked here
            perm = permutation if isinstance(permutation, torch.Tensor) else \
                torch.as_tensor(permutation, device="cpu")
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"permutation must be a sequence of ints, got {permutation!r}") \
                from None
        if perm.numel() == 0:
            raise ValueError("permutation must not be empty")
        if perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
            raise ValueError(f"permutation must hold ints, got dtype {perm.dtype}")
        perm = perm.long()
        n = perm.numel()
        if perm.dim() != 1 or not torch.equal(perm.cpu().sort().values,
                                              torch.arange(n, device="cpu")):
            raise ValueError(f"permutation must be a permutation of 0..n-1 (n >= 1), got "
                             f"{permutation!r}")
        self.features = n
        if not isinstance(permutation, torch.Tensor):  # checked on the CPU; kept where the
            perm = perm.to(torch.get_default_device())  # other modules' tensors are made
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def extra_repr(self) -> str:
        return f"features={self.features}"

    def forward(self, x, context=None):
        self._check(x)
        return x[..., self.perm], x.new_zeros(x.shape[:-1])

    def inverse(self, z, context=None):
        self._check(z, "z")
        return z[..., self.inverse_perm], z.new_zeros(z.shape[:-1])


class Reverse(Permutation):
    """Reverse the order of the features."""

    def __init__(self, features: int):
        n = checks.check_count("features", features)
        super().__init__(range(n - 1, -1, -1))
