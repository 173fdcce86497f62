"""Base densities for flows: Uniform on [0, 1]^D, StandardNormal, and a learnable
per-dimension MixtureOfGaussians. Each is an nn.Module with ``log_prob(z)`` (summed over the
D features) and ``sample(shape)`` returning ``shape + (D,)``."""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

from .functional import mixture_log_prob


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


class _Base(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        self.features = features
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # device and dtype

    def _shape(self, shape):
        try:  # an integer, or a sequence of them (as torch.Size takes)
            sizes = tuple(torch.Size([shape] if as_size(shape) is not None else shape))
        except (TypeError, ValueError):
            sizes = None
        if sizes is None or any(n < 0 for n in sizes):
            raise ValueError(f"shape must be non-negative integer sizes, got {shape!r}")
        return (*sizes, self.features)


class Uniform(_Base):
    """Uniform on [0, 1]^D: log-density 0 inside, -inf outside."""

    def log_prob(self, z):
        inside = ((z >= 0) & (z <= 1)).all(-1)
        return torch.where(inside, 0.0, -math.inf).to(z.dtype)

    def sample(self, shape):
        a = self._anchor
        return torch.rand(self._shape(shape), device=a.device, dtype=a.dtype)


class StandardNormal(_Base):
    """The unit Gaussian on R^D."""

    def log_prob(self, z):
        return -0.5 * (z * z).sum(-1) - 0.5 * self.features * math.log(2 * math.pi)

    def sample(self, shape):
        a = self._anchor
        return torch.randn(self._shape(shape), device=a.device, dtype=a.dtype)


class MixtureOfGaussians(_Base):
    """A learnable K-component Gaussian mixture for each of the D dimensions (independent)."""

    def __init__(self, features: int, components: int):
        super().__init__(features)
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        self.logits = nn.Parameter(torch.zeros(features, components))
        self.loc = nn.Parameter(torch.linspace(-2.0, 2.0, components).repeat(features, 1))
        self.log_scale = nn.Parameter(torch.zeros(features, components))

    def log_prob(self, z):
        lp = mixture_log_prob(z, self.logits, self.loc, self.log_scale, kind="gaussian")
        return lp.sum(-1)

    def sample(self, shape):
        shape = self._shape(shape)
        with torch.no_grad():
            if math.prod(shape) == 0:  # Categorical cannot draw zero samples
                return self.loc.new_empty(shape)
            k = torch.distributions.Categorical(logits=self.logits).sample(shape[:-1])
            pick = k.unsqueeze(-1)
            K = self.logits.shape[-1]
            loc = torch.gather(self.loc.expand(*shape, K), -1, pick).squeeze(-1)
            log_scale = torch.gather(self.log_scale.expand(*shape, K), -1, pick).squeeze(-1)
            return loc + torch.exp(log_scale) * torch.randn_like(loc)
