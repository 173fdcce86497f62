"""Flow: a list of transforms and a base density, with log_prob, sampling and bits/dim."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution, constraints

from ..distributions import as_size
from .transforms import Compose, chain_forward, chain_inverse


def _broadcast_context(context, x):
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


class Flow(nn.Module):
    """``log p(x) = log p_base(f(x)) + log|det df/dx|`` for f the composition of ``transforms``.

    Args:
        transforms: a list of transforms (kept as ``.transforms``), applied in order from data
            to base.
        base: a base density from :mod:`fastflow.distributions`.
    """

    def __init__(self, transforms, base):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        features = Compose(list(self.transforms)).features  # checks they agree
        self.base = base
        if base.features != features:
            raise ValueError(
                f"base has {base.features} features but the transforms have {features}"
            )
        self.features = base.features

    def forward(self, x, context=None):
        """(z, logabsdet) of the data-to-base map (context broadcast as in :meth:`log_prob`)."""
        return chain_forward(self.transforms, x, _broadcast_context(context, x))

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density of x, shape ``x.shape[:-1]``. A context of shape (B, C) is broadcast
        over x's leading axes, so that samples of shape (n, B, D) score as drawn."""
        z, lad = chain_forward(self.transforms, x, _broadcast_context(context, x))
        return self.base.log_prob(z) + lad

    def bits_per_dim(self, x, context=None) -> torch.Tensor:
        """Mean negative log-likelihood in bits per dimension."""
        return -self.log_prob(x, context).mean() / (self.features * math.log(2.0))

    def rsample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """n samples, differentiable with respect to the parameters. With a context of shape
        (B, C), n samples per context row: shape (n, B, D)."""
        return self.rsample_and_log_prob(n, context)[0]

    def rsample_and_log_prob(self, n: int, context: torch.Tensor | None = None):
        """(x, log p(x)) for n differentiable samples, from the sampling pass alone."""
        size = as_size(n)
        if size is None:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        n = size
        shape = (n,) if context is None else (n, *context.shape[:-1])
        if context is not None:
            context = context.expand(n, *context.shape)
        z = self.base.sample(shape)
        x, lad = chain_inverse(self.transforms, z, context)  # lad = log|dx/dz|
        return x, self.base.log_prob(z) - lad

    def sample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """n samples (no gradient)."""
        with torch.no_grad():
            return self.rsample(n, context)

    def distribution(self, context: torch.Tensor | None = None) -> FlowDistribution:
        """This flow as a torch.distributions.Distribution (optionally conditioned)."""
        return FlowDistribution(self, context)


class FlowDistribution(Distribution):
    """A :class:`Flow` seen through the torch.distributions interface."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, flow: Flow, context: torch.Tensor | None = None):
        self.flow, self.context = flow, context
        batch = torch.Size(()) if context is None else context.shape[:-1]
        super().__init__(batch, torch.Size((flow.features,)), validate_args=False)

    @property
    def support(self):
        return constraints.real_vector

    def log_prob(self, value):
        return self.flow.log_prob(value, self.context)

    def rsample(self, sample_shape=()):
        shape = torch.Size(sample_shape)
        n = math.prod(shape)
        x = self.flow.rsample(n, self.context)
        return x.reshape(*shape, *self.batch_shape, self.flow.features)

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.rsample(sample_shape)
