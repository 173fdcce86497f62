"""Test helpers: random mixtures and an independent float64 oracle built on scipy."""

from __future__ import annotations

import numpy as np
import torch
from scipy import special

import fastflow


def random_mixture(shape, K, *, dtype=torch.float32, device="cpu", logit_spread=2.0,
                   log_scale_range=(-1.0, 1.0), loc_spread=2.0, shared=False):
    """(logits, loc, log_scale) of shape shape + (K,) or, with shared=True, shape[-1:] + (K,)."""
    pshape = (*shape[-1:], K) if shared and len(shape) else (*shape, K)
    lo, hi = log_scale_range
    logits = (torch.rand(pshape, dtype=torch.float64) * 2 - 1) * logit_spread
    loc = torch.randn(pshape, dtype=torch.float64) * loc_spread
    log_scale = lo + (hi - lo) * torch.rand(pshape, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (logits, loc, log_scale)]


def sample_x(logits, loc, log_scale, shape, u_max, *, dtype=None):
    """x = loc_j + s_j * u for a random component j and u uniform in [-u_max, u_max]."""
    full = (*shape, logits.shape[-1])
    loc, log_scale = loc.expand(full).double(), log_scale.expand(full).double()
    j = torch.randint(0, logits.shape[-1], shape, device=loc.device).unsqueeze(-1)
    u = (torch.rand(shape, dtype=torch.float64, device=loc.device) * 2 - 1) * u_max
    x = loc.gather(-1, j).squeeze(-1) + torch.exp(log_scale.gather(-1, j).squeeze(-1)) * u
    return x.to(dtype or logits.dtype)


def _np(t):
    return t.detach().double().cpu().numpy()


def oracle(x, logits, loc, log_scale, kind):
    """Independent float64 forward: dict of log F, log(1-F), log f, logit y, logit lad.

    Built from scipy.special (log_ndtr, log_expit, logsumexp) in numpy, with no code shared
    with fastflow.
    """
    x, logits, loc, log_scale = (_np(t) for t in (x, logits, loc, log_scale))
    log_pi = logits - special.logsumexp(logits, axis=-1, keepdims=True)
    u = (x[..., None] - loc) * np.exp(-log_scale)
    if kind == "logistic":
        log_c, log_s = special.log_expit(u), special.log_expit(-u)
        log_d = log_c + log_s
    else:
        log_c, log_s = special.log_ndtr(u), special.log_ndtr(-u)
        log_d = -0.5 * u * u - 0.5 * np.log(2 * np.pi)
    log_F = special.logsumexp(log_pi + log_c, axis=-1)
    log_S = special.logsumexp(log_pi + log_s, axis=-1)
    log_f = special.logsumexp(log_pi + log_d - log_scale, axis=-1)
    return {
        "log_F": log_F, "log_S": log_S, "log_f": log_f,
        "unit": np.exp(log_F), "logit": log_F - log_S, "logit_lad": log_f - log_F - log_S,
    }


def oracle_forward(x, logits, loc, log_scale, kind, output):
    """(y, lad) of the float64 oracle in the given output space."""
    o = oracle(x, logits, loc, log_scale, kind)
    if output == "unit":
        return o["unit"], o["log_f"]
    return o["logit"], o["logit_lad"]


def oracle_root(y, logits, loc, log_scale, kind, output, iters=400):
    """float64 root of oracle_forward(x) = y by plain bisection on [-1e15, 1e15] (numpy)."""
    y = _np(y)
    with np.errstate(divide="ignore"):
        target = y if output == "logit" else np.log(y) - np.log1p(-y)
    lo = np.full(y.shape, -1e15)
    hi = np.full(y.shape, 1e15)
    for _ in range(iters):
        mid = 0.5 * lo + 0.5 * hi
        below = oracle(torch.from_numpy(mid), logits, loc, log_scale, kind)["logit"] < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * lo + 0.5 * hi


def rel_err(a, b, floor=1.0):
    a, b = np.asarray(_np(a) if isinstance(a, torch.Tensor) else a), np.asarray(b)
    return np.abs(a - b) / np.maximum(floor, np.abs(b))


def assert_close_grads(got, want, *, rtol, atol, names=("x", "logits", "loc", "log_scale")):
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def call(op, *args, **kwargs):
    return getattr(fastflow, op)(*args, **kwargs)


def ulp_sensitivity(x, logits, loc, log_scale, kind, key, draws=8, seed=0):
    """How far the exact (float64) oracle quantity moves when every float32 input is nudged by
    one unit in the last place (random signs), maximised over a few draws: the error any
    float32 evaluation may make without being less accurate than its inputs (backward
    stability)."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.finfo(torch.float32).eps / 2
    base = oracle(x, logits, loc, log_scale, kind)[key]
    worst = np.zeros_like(base)
    for _ in range(draws):
        signs = [torch.randint(0, 2, t.shape, generator=gen) * 2 - 1
                 for t in (x, logits, loc, log_scale)]
        nudged = [t.double().cpu() * (1 + eps * s)
                  for t, s in zip((x, logits, loc, log_scale), signs, strict=True)]
        worst = np.maximum(worst, np.abs(oracle(*nudged, kind)[key] - base))
    return worst
