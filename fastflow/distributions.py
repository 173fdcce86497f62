"""Base densities for flows: Uniform on [0, 1]^D, StandardNormal, and a learnable
per-dimension MixtureOfGaussians.

Each is an nn.Module with ``log_prob(z)`` (summed over the D features), ``rsample(shape)``
returning ``shape + (D,)`` draws that are differentiable with respect to the base's parameters,
``sample(shape)`` (the same draws without a graph), ``has_rsample = True``, and ``support``, a
torch.distributions constraint on the values of one feature (so a flow can check that its last
transform's output range matches its base)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import constraints

from .checks import check_count, check_float_tensor, sample_shape
from .functional import mixture_cdf_inverse, mixture_log_prob


class _Base(nn.Module):
    """Shared by the bases: the feature count, a buffer that follows ``.to()``/``.double()``
    (its device and dtype are the draws'), the shape check, and ``sample`` as ``rsample``
    without a graph."""

    has_rsample = True

    def __init__(self, features: int):
        super().__init__()
        self.features = check_count("features", features)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # device and dtype

    def _shape(self, shape):
        return (*sample_shape("shape", shape), self.features)

    def _check_value(self, z) -> None:
        """ValueError unless z is a floating tensor of shape (..., D)."""
        check_float_tensor(z, "z")
        if z.dim() < 1 or z.shape[-1] != self.features:
            raise ValueError(f"z must have {self.features} features (shape (..., "
                             f"{self.features})), got shape {tuple(z.shape)}")

    def rsample(self, shape):
        raise NotImplementedError

    def sample(self, shape):
        """Draws of shape ``shape + (D,)`` with no autograd graph: :meth:`rsample` under
        ``torch.no_grad``, so both follow the same distribution by construction."""
        with torch.no_grad():
            return self.rsample(shape)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Uniform(_Base):
    """Uniform on [0, 1]^D: log-density 0 inside, -inf outside."""

    support = constraints.unit_interval

    def log_prob(self, z):
        self._check_value(z)
        inside = ((z >= 0) & (z <= 1)).all(-1)
        return torch.where(inside, 0.0, -math.inf).to(z.dtype)

    def rsample(self, shape):
        """Uniform draws of shape ``shape + (D,)``; there are no parameters, so this is
        ``sample`` under another name, kept for a common interface across bases."""
        a = self._anchor
        return torch.rand(self._shape(shape), device=a.device, dtype=a.dtype)


class StandardNormal(_Base):
    """The unit Gaussian on R^D."""

    support = constraints.real

    def log_prob(self, z):
        self._check_value(z)
        return -0.5 * (z * z).sum(-1) - 0.5 * self.features * math.log(2 * math.pi)

    def rsample(self, shape):
        """Unit Gaussian draws of shape ``shape + (D,)``; there are no parameters, so this is
        ``sample`` under another name, kept for a common interface across bases."""
        a = self._anchor
        return torch.randn(self._shape(shape), device=a.device, dtype=a.dtype)


class MixtureOfGaussians(_Base):
    """A learnable K-component Gaussian mixture for each of the D dimensions (independent):
    parameters ``logits``, ``loc`` and ``log_scale`` of shape (D, K), with weights
    ``softmax(logits)`` and scales ``exp(log_scale)``."""

    support = constraints.real

    def __init__(self, features: int, components: int):
        super().__init__(features)
        self.components = check_count("components", components)
        self.logits = nn.Parameter(torch.zeros(features, components))
        self.loc = nn.Parameter(torch.linspace(-2.0, 2.0, components).repeat(features, 1))
        self.log_scale = nn.Parameter(torch.zeros(features, components))

    def extra_repr(self) -> str:
        return f"features={self.features}, components={self.components}"

    def log_prob(self, z):
        self._check_value(z)
        lp = mixture_log_prob(z, self.logits, self.loc, self.log_scale, kind="gaussian")
        return lp.sum(-1)

    def rsample(self, shape):
        """Reparameterized draws of shape ``shape + (D,)``: z = F^-1(U) for F the mixture CDF
        and U uniform, through :func:`fastflow.mixture_cdf_inverse`, whose implicit-function
        gradients reach all of ``logits``, ``loc`` and ``log_scale`` (picking a component, as a
        categorical draw does, would give no gradient to ``logits``).

        U is drawn in logit space, t = log U - log(1 - U) (standard logistic), and inverted
        with ``output="logit"``: near U = 1, 1 - U has no float32 resolution left and the unit
        output would round to the upper endpoint, an infinite z. U is kept above 0 (the
        smallest normal float) so t is finite. Value checks follow the global
        ``validate_args`` default: with it on, non-finite parameters raise ValueError (one
        host synchronisation per draw); with it off nothing is checked.
        """
        shape = self._shape(shape)
        loc = self.loc
        u = torch.rand(shape, device=loc.device, dtype=loc.dtype)
        u = u.clamp_(min=torch.finfo(u.dtype).tiny)
        t = torch.log(u) - torch.log1p(-u)
        z, _ = mixture_cdf_inverse(t, self.logits, loc, self.log_scale, kind="gaussian",
                                   output="logit")
        return z
