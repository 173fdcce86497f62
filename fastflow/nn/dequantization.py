"""Dequantization of integer data for continuous flows (Flow++).

A dequantizer maps integer data x in {0, ..., levels - 1}^D to y = (x + u) / levels in
[0, 1]^D with noise u drawn from q(u | x), and returns log q(y | x). Then
``log P(x) >= E_q[log p(y) - log q(y | x)]`` (:func:`dequantized_log_prob`), a bound on the
discrete log-likelihood that training maximises.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_count
from ..distributions import StandardNormal
from .flow import Flow
from .transforms import AutoregressiveMixtureFlow, Logit


class _Dequantizer(nn.Module):
    def __init__(self, features: int, levels: int):
        super().__init__()
        self.features = check_count("features", features)
        self.levels = check_count("levels", levels, 2)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex():
            raise ValueError(f"x must be an integer tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() < 1 or x.shape[-1] != self.features:
            raise ValueError(f"x must have {self.features} features, got shape {tuple(x.shape)}")
        # Compared as int64: a uint8 tensor against levels = 256 would wrap to 0.
        if x.numel() and (x.min() < 0 or x.max().long() >= self.levels):
            raise ValueError(f"x must lie in [0, {self.levels - 1}] (levels={self.levels})")


def _in_cell(x: torch.Tensor, u: torch.Tensor, levels: int) -> torch.Tensor:
    """y = (x + u) / levels, kept strictly inside x's cell: rounding can put it on an end
    (255 + u rounds to 256 in float32 for u > 1 - 2^-17, and u = 0 gives y = 0 for x = 0),
    where a Logit with alpha = 0 gives -inf. Moves y by at most one ulp."""
    xf = x.to(u.dtype)
    y = (xf + u) / levels
    lo = torch.nextafter(xf / levels, torch.ones_like(y))
    hi = torch.nextafter((xf + 1) / levels, torch.zeros_like(y))
    return torch.minimum(torch.maximum(y, lo), hi)


class UniformDequantization(_Dequantizer):
    """u ~ U[0, 1)^D: q(y | x) = levels^D on x's cell (y strictly inside it)."""

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32):
        self._check(x)
        u = torch.rand(x.shape, dtype=dtype, device=x.device)
        log_q = torch.full(x.shape[:-1], self.features * math.log(self.levels), dtype=dtype,
                           device=x.device)
        return _in_cell(x, u, self.levels), log_q


class VariationalDequantization(_Dequantizer):
    """u ~ q(u | x), a conditional flow trained jointly with the model (Flow++).

    q is Gaussian noise pushed through a conditional inverse-autoregressive mixture-CDF flow
    (one pass to sample, with its exact log-density) and a sigmoid onto (0, 1)^D; x, scaled to
    [0, 1], is the context.
    """

    def __init__(self, features: int, levels: int, components: int = 4,
                 hidden_features=(32, 32), seed: int | None = None):
        super().__init__(features, levels)
        self.noise = Flow(
            [Logit(features, alpha=0.0),
             AutoregressiveMixtureFlow(features, components, hidden_features,
                                       output="logit", direction="iaf",
                                       context_features=features, seed=seed)],
            StandardNormal(features),
        )

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32):
        self._check(x)
        context = x.to(dtype) / (self.levels - 1)
        u, log_q_u = self.noise.rsample_and_log_prob(1, context)
        u, log_q_u = u[0], log_q_u[0]
        return _in_cell(x, u, self.levels), log_q_u + self.features * math.log(self.levels)


def dequantized_log_prob(flow: Flow, dequantizer: _Dequantizer, x: torch.Tensor,
                         context: torch.Tensor | None = None) -> torch.Tensor:
    """A one-sample estimate of the bound log p(y) - log q(y | x) <= log P(x), in nats,
    computed in the flow's dtype."""
    y, log_q = dequantizer(x, dtype=flow.dtype)
    return flow.log_prob(y, context) - log_q
