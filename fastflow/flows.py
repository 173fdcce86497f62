"""One-line flows: ``MAF``, ``IAF``, ``MixtureCDF`` and ``Coupling``.

Each constructor takes ``features, context=0, transforms=..., components=...,
hidden_features=..., kind=...`` and returns a :class:`fastflow.nn.Flow` with a standard normal
base, whose call gives a ``torch.distributions.Distribution`` (conditioned on the context
given, if any)::

    flow = fastflow.flows.MAF(2, transforms=3, hidden_features=(64, 64))
    loss = -flow().log_prob(x).mean()          # or flow.log_prob(x)
    x = flow().sample((1000,))                  # or flow.sample(1000)

Every mixture transform uses ``output="logit"`` (onto R, for the Gaussian base). Between
transforms the features are reversed, so each dimension is conditioned on the others in turn.
"""

from __future__ import annotations

from torch import nn

from .checks import check_count, check_seed, hidden_sizes
from .distributions import StandardNormal
from .nn import AutoregressiveMixtureFlow, Flow, FlowDistribution, MixtureCDFFlow, Reverse
from .nn.coupling import CouplingMixtureFlow


class _OneLineFlow(Flow):
    """A Flow whose call returns its distribution, as zuko's flows do."""

    context_features = 0

    def forward(self, context=None) -> FlowDistribution:
        """The flow as a torch Distribution, conditioned on ``context`` (B..., C) if given."""
        if (context is None) != (self.context_features == 0):
            raise ValueError(
                f"{type(self).__name__} was built with context={self.context_features}: "
                + ("call it with a context tensor" if context is None else
                   "call it without one (for (z, logabsdet) of data, use transform(x))"))
        return self.distribution(context)

    def transform(self, x, context=None):
        """(z, logabsdet) of the data-to-base map (what :meth:`Flow.forward` gives)."""
        return Flow.forward(self, x, context)


def _check_counts(features: int, transforms: int, components: int, context: int) -> None:
    for name, value, least in (("features", features, 1), ("transforms", transforms, 1),
                               ("components", components, 1), ("context", context, 0)):
        check_count(name, value, least)


def _built(network, n_in: int, n_out: int) -> nn.Module:
    module = network(n_in, n_out)
    if not isinstance(module, nn.Module):
        raise ValueError(f"network({n_in}, {n_out}) must return a torch.nn.Module, got "
                         f"{type(module).__name__}")
    return module


def _interleave(layers, features):
    """The layers with a Reverse between each pair."""
    out = []
    for i, layer in enumerate(layers):
        if i:
            out.append(Reverse(features))
        out.append(layer)
    return out


class MAF(_OneLineFlow):
    """Masked autoregressive mixture-CDF flow: density in one pass, sampling in one
    sequential pass (one Triton kernel on a GPU)."""

    direction = "maf"

    def __init__(self, features: int, context: int = 0, transforms: int = 3,
                 components: int = 8, hidden_features=(64, 64), kind: str = "logistic",
                 seed: int | None = None):
        _check_counts(features, transforms, components, context)
        seed = check_seed(seed)
        hidden = hidden_sizes("hidden_features", hidden_features)
        layers = [AutoregressiveMixtureFlow(
            features, components, hidden, kind=kind,
            direction=self.direction, output="logit", context_features=context or None,
            seed=None if seed is None else seed + i) for i in range(transforms)]
        super().__init__(_interleave(layers, features), StandardNormal(features))
        self.context_features = context


class IAF(MAF):
    """Inverse autoregressive mixture-CDF flow: sampling in one pass, the density of
    external data sequential over the dimensions."""

    direction = "iaf"


class MixtureCDF(_OneLineFlow):
    """Elementwise mixture-CDF flow: each feature through its own learned mixture CDF
    (independent features; ``transforms`` of them composed). Unconditional: a conditional
    flow needs a conditioner (use MAF or Coupling)."""

    def __init__(self, features: int, context: int = 0, transforms: int = 1,
                 components: int = 8, hidden_features=(), kind: str = "logistic"):
        _check_counts(features, transforms, components, context)
        if context:
            raise ValueError("MixtureCDF has no conditioner and takes no context; use MAF or "
                             "Coupling for a conditional flow")
        if hidden_sizes("hidden_features", hidden_features, allow_empty=True):
            raise ValueError("MixtureCDF has no network: hidden_features must be empty")
        layers = [MixtureCDFFlow(features, components, kind=kind) for _ in range(transforms)]
        super().__init__(layers, StandardNormal(features))


class Coupling(_OneLineFlow):
    """Coupling mixture-CDF flow (Flow++'s layer): in each transform the first half of the
    features conditions the mixture of the other half through a network, so the density and
    sampling are each one network pass per transform.

    ``network``, if given, is called as ``network(in_features, out_features)`` to build each
    conditioner (in = D // 2 + context, out = (D - D // 2) * 3 * components)."""

    def __init__(self, features: int, context: int = 0, transforms: int = 4,
                 components: int = 8, hidden_features=(64, 64), kind: str = "logistic",
                 network=None):
        _check_counts(features, transforms, components, context)
        if features < 2:
            raise ValueError(f"features must be >= 2 for a coupling flow, got {features}")
        n_in = features // 2 + context
        n_out = (features - features // 2) * 3 * components
        if network is not None and not callable(network):
            raise ValueError(f"network must be callable as network(in_features, out_features) "
                             f"returning a torch.nn.Module, got {type(network).__name__}")
        layers = [CouplingMixtureFlow(
            features, components, hidden_features, kind=kind,
            context_features=context or None,
            network=None if network is None else _built(network, n_in, n_out))
            for _ in range(transforms)]
        super().__init__(_interleave(layers, features), StandardNormal(features))
        self.context_features = context


__all__ = ["IAF", "MAF", "Coupling", "MixtureCDF"]
