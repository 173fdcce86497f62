"""Flow: a list of transforms and a base density, with log_prob, sampling and bits/dim."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from torch.distributions import Distribution, constraints

from .. import checks
from ..checks import check_float_tensor
from .transforms import Compose, Transform, broadcast_context, chain_inverse


def _range_name(c) -> str | None:
    """"R" or "[0, 1]" for the per-feature constraints fastflow's transforms and bases use
    (wrappers that keep a base constraint, such as ``independent`` and a mixture's, are
    unwrapped), else None."""
    while isinstance(getattr(c, "base_constraint", None), constraints.Constraint):
        c = c.base_constraint
    if c is constraints.real or type(c) is type(constraints.real):
        return "R"
    if isinstance(c, constraints.interval | constraints.half_open_interval):
        # Bounds are numbers or per-feature tensors (Uniform(zeros(D), ones(D))).
        lower, upper = torch.as_tensor(c.lower_bound), torch.as_tensor(c.upper_bound)
        if bool((lower == 0).all()) and bool((upper == 1).all()):
            return "[0, 1]"
    return None


def _short(text: str, limit: int = 100) -> str:
    """text cut to ``limit`` characters (a constraint's repr can print whole bound tensors)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(t) -> str:
    output = getattr(t, "output", None)
    return type(t).__name__ + ("" if output is None else f"(output={output!r})")


def check_ranges(transforms, base) -> None:
    """ValueError where a transform is given values outside its domain, or where the last
    transform's range is not the base's support: a unit output into a Gaussian base leaves
    the density unnormalized, a logit output into a Uniform base gives -inf almost everywhere.
    """
    current, source, last = None, None, None
    for i, t in enumerate(transforms):
        domain = _range_name(t.domain) if t.domain is not None else None
        if domain == "[0, 1]" and current == "R":
            raise ValueError(
                f"transform {i}, {_describe(t)}, takes values in [0, 1] but {source} gives "
                f"values in R")
        if domain == "R" and current == "[0, 1]":
            raise ValueError(
                f"transform {i}, {_describe(t)}, takes values in R but {source} gives "
                f"values in [0, 1] only: the flow's density would not integrate to one"
                + ("; build the earlier one with output='logit'" if hasattr(last, "output")
                   else ""))
        if t.codomain is not None:
            current, source = _range_name(t.codomain), f"transform {i}, {_describe(t)},"
            last = t
    support = getattr(base, "support", None)
    if current is None or support is None:
        return
    known = _range_name(support)
    if known == current:
        return
    where, base_name = known or _short(repr(support)), type(base).__name__
    # Rebuilding the last transform helps only where the base lives on the other range.
    other_output, other_range = ("logit", "R") if current == "[0, 1]" else ("unit", "[0, 1]")
    if not known:
        fix = ""
    elif hasattr(last, "output"):
        fix = f"build it with output={other_output!r}, or "
    else:
        fix = f"end the chain with a transform onto {other_range}, or "
    if current == "[0, 1]":
        raise ValueError(
            f"the last transform, {_describe(last)}, maps onto [0, 1] but the base "
            f"{base_name} lives on {where}: the flow's density would not integrate to one; "
            f"{fix}use a Uniform base on [0, 1]")
    raise ValueError(
        f"the last transform, {_describe(last)}, maps onto R but the base {base_name} lives on "
        f"{where}: points outside it would get log-density -inf; {fix}use a base on R such "
        f"as StandardNormal")


class Flow(nn.Module):
    """``log p(x) = log p_base(f(x)) + log|det df/dx|`` for f the composition of ``transforms``.

    Args:
        transforms: a transform or a list of them (kept as ``.transforms``), applied in order
            from data to base.
        base: a base density: one from :mod:`fastflow.distributions`, or a
            torch.distributions.Distribution with event shape (D,).

    The last transform's range must be the base's support (checked here): a mixture
    transform with ``output="logit"`` (the default) goes with a base on R^D such as
    StandardNormal, ``output="unit"`` with Uniform.

    The flow computes in the wider of the data's and its parameters' floating dtypes (float32
    data into a float64 flow is promoted to float64, float64 data into a float32 flow runs
    every layer in float64); data on another device than the flow's is refused with a
    ValueError.
    """

    def __init__(self, transforms, base):
        super().__init__()
        if isinstance(transforms, Transform):
            transforms = [transforms]
        try:
            transforms = list(transforms)
        except TypeError:
            raise ValueError(f"transforms must be a Transform or a list of them, got "
                             f"{type(transforms).__name__}") from None
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise ValueError(f"transforms[{i}] must be a fastflow Transform, got "
                                 f"{type(t).__name__}")
        self.transforms = nn.ModuleList(transforms)
        features = Compose(list(self.transforms)).features  # checks they agree
        self.base = base
        base_features = _base_features(base)
        if base_features != features:
            raise ValueError(
                f"base has {base_features} features but the transforms have {features}"
            )
        check_ranges(self.transforms, base)
        self.features = features

    def _dtype_device(self):
        """The dtype and device the flow computes in: its first floating parameter's or
        buffer's (the base's included)."""
        for t in (*self.parameters(), *self.buffers()):
            if t.is_floating_point():
                return t.dtype, t.device
        return torch.get_default_dtype(), torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the flow computes in (its parameters')."""
        return self._dtype_device()[0]

    @property
    def device(self) -> torch.device:
        """The device of the flow's parameters."""
        return self._dtype_device()[1]

    def _prepare(self, x, name: str = "x") -> torch.Tensor:
        check_float_tensor(x, name)
        dtype, device = self._dtype_device()
        _check_not_meta(x.device, name)
        _check_not_meta(device, "the flow")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the flow is on {device}; move one "
                             f"of them with .to()")
        # Promote, never demote: float32 data into a float64 flow computes in float64 (as
        # float64 data into a float32 flow always has: the layers run in the wider dtype).
        return x.to(torch.promote_types(x.dtype, dtype))

    def _check_takes_context(self, context) -> None:
        if context is not None:
            check_float_tensor(context, "context")
        if context is not None and all(t.takes_context is False for t in self.transforms):
            raise ValueError(
                "context was given but no transform of this flow takes one; build a "
                "conditional flow (e.g. fastflow.flows.MAF(features, context=C))")

    def _forward_guarded(self, x, context):
        """(z, logabsdet, lost): the data-to-base chain. Rows whose values leave the floating
        range on the way (a far tail of a steep transform overflows, or a network fed such a
        value overflows inside, leaving no value for the row's logabsdet) are flagged in
        ``lost`` and set to zero before the next transform, so that they cause no NaN (and no
        spurious "not finite" error) downstream. Rows of x holding NaN are not flagged:
        their NaN comes through. On R, rows holding +-inf (a sample that overflowed) are
        flagged too: their density is 0."""
        x = self._prepare(x)
        self._check_takes_context(context)
        context = broadcast_context(context, x)
        value, total, lost = x, None, None
        if _range_name(self.transforms[0].domain) == "R":
            lost = torch.isinf(x).any(-1)
            value = x.masked_fill(lost.unsqueeze(-1), 0.0)
        for t in self.transforms:
            value, lad = t(value, context)
            total = lad if total is None else total + lad
            out = ~torch.isfinite(value).all(-1) | torch.isnan(lad)
            lost = out if lost is None else lost | out
            value = value.masked_fill(out.unsqueeze(-1), 0.0)
        return value, total, lost & ~torch.isnan(x).any(-1)

    def forward(self, x, context=None):
        """(z, logabsdet) of the data-to-base map (context broadcast as in :meth:`log_prob`).
        Rows whose values leave the floating range on the way come out as z = inf with
        logabsdet 0 (their log-density is -inf: see :meth:`log_prob`)."""
        z, lad, lost = self._forward_guarded(x, context)
        lost = lost.unsqueeze(-1).expand_as(z)
        return z.masked_fill(lost, math.inf), lad.masked_fill(lost[..., 0], 0.0)

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density of x, shape ``x.shape[:-1]``. A context of shape (B, C) is broadcast
        over x's leading axes, so that samples of shape (n, B, D) score as drawn. Finite x
        gives a finite log-density, or -inf where its value is below the dtype's range (a
        row whose values overflow inside the chain); never NaN. On R a row holding +-inf
        (as a sample that overflowed is) gets -inf, with zero gradient."""
        z, lad, lost = self._forward_guarded(x, context)
        return (self.base.log_prob(z) + lad).masked_fill(lost, -math.inf)

    def bits_per_dim(self, x, context=None) -> torch.Tensor:
        """Mean negative log-likelihood of continuous x in bits per dimension. For discrete
        data (images of L levels) report :func:`fastflow.nn.dequantized_log_prob`'s bound
        instead: this omits the dequantizer's -log q term (log2 L bits per dimension for
        uniform dequantization of data scaled to [0, 1))."""
        return -self.log_prob(x, context).mean() / (self.features * math.log(2.0))

    def rsample(self, sample_shape=(), context: torch.Tensor | None = None) -> torch.Tensor:
        """Samples of shape ``sample_shape + (D,)`` (an int n gives (n, D)), differentiable
        with respect to the parameters. With a context of shape (B, C), ``sample_shape``
        samples per context row: shape ``sample_shape + (B, D)``."""
        return self.rsample_and_log_prob(sample_shape, context)[0]

    def rsample_and_log_prob(self, sample_shape=(), context: torch.Tensor | None = None):
        """(x, log p(x)) for differentiable samples, from the sampling pass alone."""
        shape = checks.sample_shape("sample_shape", sample_shape)
        dtype, device = self._dtype_device()
        _check_not_meta(device, "the flow")
        self._check_takes_context(context)
        n = math.prod(shape)
        batch = () if context is None else tuple(context.shape[:-1])
        if context is not None:
            context = context.expand(n, *context.shape)
        z = _base_rsample(self.base, (n, *batch))
        # A torch.distributions base keeps its own dtype: promote its draws to the flow's
        # (never demote), as log_prob promotes its input, so a float64 flow samples in float64.
        z = z.to(torch.promote_types(z.dtype, dtype))
        x, lad = chain_inverse(self.transforms, z, context)  # lad = log|dx/dz|
        # A sample that overflowed (a scale past the dtype's range) has no representable
        # density: -inf, as log_prob gives for it.
        log_p = (self.base.log_prob(z) - lad).masked_fill(~torch.isfinite(x).all(-1),
                                                          -math.inf)
        return x.reshape(*shape, *batch, self.features), log_p.reshape(shape + batch)

    def sample(self, sample_shape=(), context: torch.Tensor | None = None) -> torch.Tensor:
        """Samples of shape ``sample_shape + (D,)`` (no gradient)."""
        with torch.no_grad():
            return self.rsample(sample_shape, context)

    def distribution(self, context: torch.Tensor | None = None) -> FlowDistribution:
        """This flow as a torch.distributions.Distribution (optionally conditioned)."""
        return FlowDistribution(self, context)


def _check_not_meta(device: torch.device, name: str) -> None:
    if device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values: a flow needs "
                         f"real tensors (move a meta-initialised flow with "
                         f"to_empty(device=...) and load its weights first)")


def _base_features(base) -> int | None:
    """D of a fastflow base (``features``) or of a torch.distributions one (its event
    shape, which must be (D,))."""
    if isinstance(base, Distribution):
        event = tuple(base.event_shape)
        if len(event) != 1:
            raise ValueError(f"base must have event shape (D,), got {event}; wrap a "
                             f"distribution over scalars in torch.distributions.Independent")
        if base.batch_shape:
            raise ValueError(f"base must have batch shape (), got {tuple(base.batch_shape)}: "
                             f"a flow's batch comes from its context or from "
                             f"flow.distribution().expand(...)")
        return event[0]
    if not hasattr(base, "features") or not hasattr(base, "log_prob"):
        raise ValueError(f"base must be a fastflow base or a torch.distributions.Distribution, "
                         f"got {type(base).__name__}")
    return base.features


def _base_rsample(base, shape):
    """shape + (D,) draws from the base, reparameterized where the base can be."""
    if getattr(base, "has_rsample", False):
        return base.rsample(torch.Size(shape))
    return base.sample(torch.Size(shape))


def _check_pyro_plates(batch_shape) -> None:
    runtime = sys.modules.get("pyro.poutine.runtime")
    if runtime is None:  # pyro not imported: no plate can be active
        return
    for frame in runtime.get_plates():
        if frame.dim is None:  # a sequential plate: nothing to broadcast
            continue
        size = batch_shape[frame.dim] if -frame.dim <= len(batch_shape) else 1
        if size != frame.size:
            raise ValueError(
                f"pyro.plate {frame.name!r} (size {frame.size}, dim {frame.dim}) is active but "
                f"this FlowDistribution has batch shape {tuple(batch_shape)}, and pyro expands "
                f"only its own distributions: sample pyro.contrib.zuko.ZukoToPyro(dist), or "
                f"dist.expand(...) to the plates' shape")


class FlowDistribution(Distribution):
    """A :class:`Flow` seen through the torch.distributions interface.

    Unconditional, its batch shape is () unless :meth:`expand` gives it one; with a context
    of shape (B..., C) it is B... . ``log_prob(value)`` broadcasts value's leading axes
    against the batch shape; ``sample(shape)`` returns ``shape + batch_shape + (D,)``.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, flow: Flow, context: torch.Tensor | None = None,
                 batch_shape: torch.Size | None = None):
        if context is not None:
            check_float_tensor(context, "context")
            wanted = [t.context_features for t in flow.transforms
                      if getattr(t, "context_features", None) is not None]
            if context.dim() == 0 or (wanted and context.shape[-1] != wanted[0]):
                raise ValueError(
                    f"context must have shape (..., {wanted[0] if wanted else 'C'}), the "
                    f"flow's context features last, got {tuple(context.shape)}")
        self.flow, self.context = flow, context
        # The parameters it was made with (see _check_parameters).
        self._first = next(iter(flow.parameters()), None)
        if batch_shape is None:
            batch_shape = torch.Size(()) if context is None else context.shape[:-1]
        super().__init__(torch.Size(batch_shape), torch.Size((flow.features,)),
                         validate_args=False)

    @property
    def support(self):
        domain = Compose(list(self.flow.transforms)).domain
        return constraints.independent(domain if domain is not None else constraints.real, 1)

    def expand(self, batch_shape, _instance=None):
        """The same flow with batch shape ``batch_shape`` (a conditional flow's context is
        expanded to it: views, no copies)."""
        batch_shape = torch.Size(batch_shape)
        try:  # as a tensor expands: the current batch shape must broadcast to the new one
            fits = torch.broadcast_shapes(self.batch_shape, batch_shape) == batch_shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"batch_shape {tuple(batch_shape)} is not an expansion of this "
                             f"distribution's batch shape {tuple(self.batch_shape)}")
        context = self.context
        if context is not None:
            context = context.expand(*batch_shape, context.shape[-1])
        expanded = FlowDistribution(self.flow, context, batch_shape)
        expanded._first = self._first
        return expanded

    def _check_parameters(self) -> None:
        """ValueError where the flow's parameters are no longer those it was made with: a
        distribution made inside ``torch.func.functional_call`` (or ``stack_module_state``
        with vmap) and used after the call has put the module's own parameters back would
        otherwise silently score with those."""
        if next(iter(self.flow.parameters()), None) is not self._first:
            raise ValueError(
                "this distribution was made while the flow had other parameters (inside "
                "torch.func.functional_call?) and is used after they were swapped back; "
                "compute log_prob or samples inside the call, e.g. through a module whose "
                "forward returns flow(context).log_prob(x)")

    def log_prob(self, value):
        check_float_tensor(value, "value")
        if value.dim() == 0 or value.shape[-1] != self.flow.features:
            raise ValueError(f"value must have shape (..., {self.flow.features}), the event "
                             f"last, got {tuple(value.shape)}")
        try:
            lead = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(f"value of shape {tuple(value.shape)} does not broadcast against "
                             f"the batch shape {tuple(self.batch_shape)} (with event shape "
                             f"{tuple(self.event_shape)})") from None
        if value.shape[:-1] != lead:
            value = value.expand(*lead, value.shape[-1])
        self._check_parameters()
        return self.flow.log_prob(value, self.context)

    def rsample(self, sample_shape=()):
        return self.rsample_and_log_prob(sample_shape)[0]

    def rsample_and_log_prob(self, sample_shape=()):
        """(x, log p(x)) for differentiable samples of shape ``sample_shape + batch_shape +
        (D,)``, the density from the sampling pass alone (zuko's method of that name)."""
        shape = tuple(checks.sample_shape("sample_shape", sample_shape))
        self._check_parameters()
        if self.context is None:
            return self.flow.rsample_and_log_prob(shape + tuple(self.batch_shape))
        return self.flow.rsample_and_log_prob(shape, self.context)

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def __call__(self, sample_shape=()):
        """A reparameterized draw, as pyro's sample statements call a distribution.

        pyro's plates expand only pyro's own distributions: inside a ``pyro.plate`` whose
        size this distribution's batch shape does not already have, a ValueError says to
        wrap it as ``pyro.contrib.zuko.ZukoToPyro(dist)`` (which plates expand) rather than
        return a draw of the wrong shape."""
        _check_pyro_plates(self.batch_shape)
        return self.rsample(sample_shape)

    @property
    def event_dim(self) -> int:
        return 1

    def score_parts(self, value, *args, **kwargs):
        """pyro's ELBO terms of a reparameterized site: the log-density is both the
        log-probability and the entropy term, with no score-function term."""
        from pyro.distributions.score_parts import ScoreParts

        log_p = self.log_prob(value)
        return ScoreParts(log_prob=log_p, score_function=0, entropy_term=log_p)

    _ESTIMATES = {
        "mean": "dist.sample((10000,)).mean(0)",
        "variance": "dist.sample((10000,)).var(0)",
        "stddev": "dist.sample((10000,)).std(0)",
        "entropy": "-dist.log_prob(dist.sample((10000,))).mean(0)",
    }

    def _no_closed_form(self, what: str):
        raise NotImplementedError(f"a flow's {what} has no closed form; estimate it from "
                                  f"samples, e.g. {self._ESTIMATES[what]}")

    @property
    def mean(self):
        self._no_closed_form("mean")

    @property
    def mode(self):
        raise NotImplementedError("a flow's mode has no closed form; search for it with "
                                  "gradient ascent on dist.log_prob")

    @property
    def variance(self):
        self._no_closed_form("variance")

    @property
    def stddev(self):
        self._no_closed_form("stddev")

    def entropy(self):
        self._no_closed_form("entropy")

    def cdf(self, value):
        raise NotImplementedError("a multivariate flow has no cdf; use log_prob")

    def icdf(self, value):
        raise NotImplementedError("a multivariate flow has no icdf; use sample or the "
                                  "transforms' inverse")


def _kl_by_samples(p, q):
    raise NotImplementedError(
        "KL divergence with a flow has no closed form; estimate it from samples of p, e.g. "
        "x = p.rsample((10000,)); (p.log_prob(x) - q.log_prob(x)).mean(0)")


# The pair of flows too: with only the two one-sided rules torch would call it ambiguous.
for _pair in ((FlowDistribution, Distribution), (Distribution, FlowDistribution),
              (FlowDistribution, FlowDistribution)):
    torch.distributions.kl.register_kl(*_pair)(_kl_by_samples)
