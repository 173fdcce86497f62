"""Generated toy data sets (no downloads): two moons, concentric rings and a smiley in 2-D."""

from __future__ import annotations

import math

import torch

from .checks import check_count, check_real


def _check(n, noise) -> tuple[int, float]:
    noise = check_real("noise", noise)
    if not 0.0 <= noise < math.inf:
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise}")
    return check_count("n", n), noise


def two_moons(n: int, noise: float = 0.05, *, generator: torch.Generator | None = None):
    """(n, 2) points on two interleaved half circles with Gaussian noise (float32)."""
    n, noise = _check(n, noise)
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x, y], -1) + noise * torch.randn(n, 2, generator=generator)
    return pts - torch.tensor([0.5, 0.25])


def rings(n: int, noise: float = 0.05, *, radii=(0.5, 1.0, 1.5),
          generator: torch.Generator | None = None):
    """(n, 2) points on concentric circles with Gaussian noise (float32); ``radii`` a
    non-empty sequence of finite radii >= 0, each circle drawn with equal probability."""
    n, noise = _check(n, noise)
    try:
        values = [float(r) for r in radii]
    except (TypeError, ValueError):  # not a sequence, or not of numbers
        values = None
    if not values or not all(0.0 <= r < math.inf for r in values):
        raise ValueError(f"radii must be a non-empty sequence of finite numbers >= 0, got "
                         f"{radii!r}")
    radii = values
    r = torch.tensor(radii)[torch.randint(0, len(radii), (n,), generator=generator)]
    angle = torch.rand(n, generator=generator) * 2 * math.pi
    pts = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], -1)
    return pts + noise * torch.randn(n, 2, generator=generator)


def smiley(n: int, noise: float = 0.05, *, generator: torch.Generator | None = None):
    """(n, 2) points on a smiling face with Gaussian noise (float32).

    Half the points lie on the outline (the unit circle), a tenth on each eye (circles of
    radius 0.12 centred at (-0.35, 0.35) and (0.35, 0.35)) and the remaining three tenths on
    the mouth, the arc of the circle of radius 0.55 about the origin from 200 to 340 degrees.
    A density with several separate pieces, some thin, so a good fit shows detail.
    """
    n, noise = _check(n, noise)
    part = torch.multinomial(torch.tensor([0.5, 0.1, 0.1, 0.3]), n, replacement=True,
                             generator=generator)
    t = torch.rand(n, generator=generator)
    full = 2 * math.pi * t
    mouth = math.radians(200.0) + math.radians(140.0) * t
    angle = torch.where(part == 3, mouth, full)
    radius = torch.tensor([1.0, 0.12, 0.12, 0.55])[part]
    centre = torch.tensor([[0.0, 0.0], [-0.35, 0.35], [0.35, 0.35], [0.0, 0.0]])[part]
    pts = centre + radius.unsqueeze(-1) * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    return pts + noise * torch.randn(n, 2, generator=generator)
