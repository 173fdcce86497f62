"""Generated toy data sets (no downloads): two moons and concentric rings in 2-D."""

from __future__ import annotations

import math

import torch


def two_moons(n: int, noise: float = 0.05, *, generator: torch.Generator | None = None):
    """(n, 2) points on two interleaved half circles with Gaussian noise (float32)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x, y], -1) + noise * torch.randn(n, 2, generator=generator)
    return pts - torch.tensor([0.5, 0.25])


def rings(n: int, noise: float = 0.05, *, radii=(0.5, 1.0, 1.5),
          generator: torch.Generator | None = None):
    """(n, 2) points on concentric circles with Gaussian noise (float32)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    r = torch.tensor(radii)[torch.randint(0, len(radii), (n,), generator=generator)]
    angle = torch.rand(n, generator=generator) * 2 * math.pi
    pts = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], -1)
    return pts + noise * torch.randn(n, 2, generator=generator)
