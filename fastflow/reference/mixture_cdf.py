"""The CPU path of the mixture-CDF forward and its VJP in plain PyTorch, faster than the
oracle and held to it by the tests (the inverse's CPU path, built on these, is in
:mod:`fastflow.reference.mixture_inverse`).

Every function here takes tensors that are already validated and broadcast: ``x`` of shape
``S`` and parameters of shape ``S + (K,)`` (expanded views are fine), all of one floating
dtype. Half-precision inputs are computed in float32 and returned in their own dtype.

- The forward and its VJP in probability space (``_prob_terms``, ``_prob_vjp``): F, 1 - F and
  f as sums of positive terms (each exact to a few ulps until its terms underflow) in a third
  of the passes over the components, with the elements where terms may have underflowed (far
  tails, tiny scales) or sums are not finite recomputed in log space by the oracle
  (:mod:`fastflow.reference.naive`), whose formulas the written-out log-space VJP
  (``vjp_pieces`` / ``vjp_assemble``) differentiates.

Gradients are written out (the same formulas as the kernels, checked by the tests against
autograd through the oracle and finite differences).
"""

from __future__ import annotations

import math

import torch

from . import naive
from .naive import (
    HALF_LOG_2PI,
    INV_SQRT2,
    LOG_2,
    component_terms,
    standardize,
    upcast,
)


def _prob_terms(x, logits, loc, log_scale, kind: str, output: str,
                for_vjp: bool = False) -> dict:
    """The forward's per-component terms in probability space, and their sums.

    pi, 1/s; pi c / s (c the standard component's density at u) and its sum f; unless
    ``output`` is "density", pi C and pi (1 - C) and their sums F and 1 - F; for the VJP also
    u, pi c and (log c)'(u). Every term is positive, so each sum is exact to a few ulps whatever
    its size, down to where its terms underflow (``_log_space_rows`` catches that), and
    1 - F is summed, never formed by subtraction. Written with few temporaries (on a CPU a
    fresh one can cost more than the arithmetic): without ``for_vjp``, u's memory is reused.
    """
    cdf = output != "density"
    pi = torch.softmax(logits, dim=-1)
    inv_s = log_scale.neg().exp_()
    u = (x.unsqueeze(-1) - loc).mul_(inv_s)
    if for_vjp:
        # |u| beyond float range with 1/s finite (|x - loc| s^-1 overflowing): the element
        # keeps finite sums, and the component's terms are exactly 0, but the VJP's
        # (log c)'(u) pi c and u du would be inf * 0. Any finite stand-in gives the zeros.
        big = torch.finfo(u.dtype).max
        u.clamp_(-big, big)
    q = {"pi": pi, "inv_s": inv_s, "u": u if for_vjp else None, "dlog": None}
    if kind == "logistic":
        c_lo = torch.sigmoid(u)
        c_hi = u.neg().sigmoid_() if for_vjp else u.neg_().sigmoid_()
        dens = c_lo * c_hi
        if for_vjp:
            # (log c)'(u) = 1 - 2 C(u) = -tanh(u / 2): C(-u) - C(u) cancels near u = 0.
            q["dlog"] = torch.tanh(u * -0.5)
    else:
        gauss = (u * u).mul_(-0.5).exp_()
        if for_vjp:
            q["dlog"] = u.neg()
        if cdf:
            # The tail side min(C, 1 - C) = erfcx(|u| / sqrt 2) exp(-u^2 / 2) / 2 shares the
            # density's exp(-u^2 / 2), so hazards c / C come out as well conditioned as
            # erfcx itself (two separately rounded erfc and exp would each carry a u^2
            # relative error); the other side is 1 minus it (at least 1/2: no cancellation).
            left = u < 0
            tail = (u.abs() if for_vjp else u.abs_()).mul_(INV_SQRT2)
            tail = torch.special.erfcx(tail).mul_(gauss).mul_(0.5)
            rest = 1.0 - tail
            c_lo, c_hi = torch.where(left, tail, rest), torch.where(left, rest, tail)
        dens = gauss.mul_(math.exp(-HALF_LOG_2PI))
    pcu = dens.mul_(pi)
    if for_vjp:
        q["pcu"], q["pc"] = pcu, pcu * inv_s
    else:
        q["pc"] = pcu.mul_(inv_s)
    q["f"] = q["pc"].sum(-1)
    if cdf:
        q["pw"], q["pwb"] = c_lo.mul_(pi), c_hi.mul_(pi)
        q["F"], q["S"] = q["pw"].sum(-1), q["pwb"].sum(-1)
    return q


def _log_space_rows(q: dict, output: str) -> torch.Tensor:
    """Elements the probability-space sums may get wrong, which take the log-space formulas.

    A term flushes to zero (or loses bits) below tiny: F and 1 - F then lose at most K tiny,
    under sqrt(tiny) of themselves if above sqrt(tiny). f's terms pi c are scaled by 1/s
    after they flush, so f must be above sqrt(tiny) max_k 1/s_k. Not finite (x infinite or
    NaN, overflowing scales), or for "logit" a ratio f / (F (1 - F)) that overflows (scales
    near float32's limit), also goes to log space.
    """
    floor = math.sqrt(torch.finfo(q["f"].dtype).tiny)
    f = q["f"]
    ok = (f > floor * q["inv_s"].amax(-1)) & (f < math.inf)
    if output != "density":
        ok &= (q["F"] > floor) & (q["S"] > floor)
    if output == "logit":
        ok &= f / (q["F"] * q["S"]) < math.inf
    return ~ok


def mixture_cdf_fwd(x, logits, loc, log_scale, kind: str, output: str):
    """(y, logabsdet) of the forward map; output in "unit" | "logit" | "density".

    For "density" y is None and logabsdet is log f(x), the mixture log-density.

    The CPU path: F, 1 - F and f summed in probability space (``_prob_terms``), a third of
    the log-space formulas' passes over the components; the elements ``_log_space_rows``
    picks (terms that may have underflowed, results that are not finite) are evaluated by
    the log-space forward (``naive.forward``, the oracle the tests hold both to).
    """
    with torch.no_grad():
        args = upcast(x, logits, loc, log_scale)
        q = _prob_terms(*args, kind, output)
        f = q["f"]
        if output == "density":
            y, lad = None, torch.log(f)
        elif output == "unit":
            y, lad = torch.where(q["F"] < 0.5, q["F"], 1.0 - q["S"]), torch.log(f)
        else:
            # Each a ratio of sums (a few ulps) under one logarithm: no cancellation.
            y, lad = torch.log(q["F"] / q["S"]), torch.log(f / (q["F"] * q["S"]))
        bad = _log_space_rows(q, output)
        if bool(bad.any()):
            y_bad, lad_bad = naive.forward(*(a[bad] for a in args), kind, output)
            lad[bad] = lad_bad
            if y is not None:
                y[bad] = y_bad
    return (None if y is None else y.to(x.dtype)), lad.to(x.dtype)


def vjp_pieces(x, logits, loc, log_scale, kind: str, output: str):
    """Per-component pieces of the forward's VJP (the kernels' formulas, in PyTorch).

    Derivatives of log F, log(1-F) and log f with respect to u_k, weighted by each sum's
    responsibilities: d log F/du_k = a_k c_k/C_k, d log(1-F)/du_k = -b_k c_k/(1-C_k),
    d log f/du_k = r_k (log c)'(u_k); hazards come from their stable log forms.
    """
    log_pi, u = standardize(x, logits, loc, log_scale)
    log_cdf, log_sf, log_pdf, log_h_sf, log_h_cdf = component_terms(u, kind)
    if kind == "logistic":
        dlog_pdf = torch.exp(log_sf) - torch.exp(log_cdf)
    else:
        dlog_pdf = -u
    resp_f = torch.softmax(log_pi + log_pdf - log_scale, dim=-1)
    p = {"u": u, "inv_s": torch.exp(-log_scale), "pi": torch.exp(log_pi),
         "resp_f": resp_f, "du_pdf": _times(resp_f, dlog_pdf)}
    if output == "density":
        zero = torch.zeros_like(resp_f)
        return {**p, "resp_cdf": zero, "resp_sf": zero, "du_cdf": zero, "du_sf": zero,
                "log_F": None, "log_S": None}
    v_cdf, v_sf = log_pi + log_cdf, log_pi + log_sf
    resp_cdf, resp_sf = torch.softmax(v_cdf, dim=-1), torch.softmax(v_sf, dim=-1)
    return {**p, "resp_cdf": resp_cdf, "resp_sf": resp_sf,
            "du_cdf": _times(resp_cdf, torch.exp(log_h_cdf)),
            "du_sf": _times(resp_sf, torch.exp(log_h_sf)),
            "log_F": torch.logsumexp(v_cdf, -1), "log_S": torch.logsumexp(v_sf, -1)}


def _times(c, v):
    """c * v, and 0 wherever c is 0 even where v is infinite: a component beyond float range
    (u = +-inf) has zero responsibilities and du next to infinite hazards, (log c)'(u), u and
    1/s, and its exact terms are 0."""
    return torch.where(c == 0, 0.0, c * v)


def output_coefs(grad_y, grad_lad, p, output: str):
    """Cotangents on (log F, log(1-F), log f) from cotangents on (y, logabsdet)."""
    zero = torch.zeros_like(grad_lad)
    if output == "unit":
        # dF = F dlog F = -(1-F) dlog(1-F): use the side below one half (no cancellation).
        upper = p["log_F"] >= -LOG_2
        c_cdf = torch.where(upper, zero, grad_y * torch.exp(p["log_F"]))
        c_sf = torch.where(upper, -grad_y * torch.exp(p["log_S"]), zero)
        return c_cdf, c_sf, grad_lad
    if output == "logit":
        return grad_y - grad_lad, -grad_y - grad_lad, grad_lad
    return zero, zero, grad_lad


def vjp_assemble(c_cdf, c_sf, c_pdf, p):
    """Grads to (x, logits, loc, log_scale) from cotangents on (log F, log(1-F), log f)."""
    c_cdf, c_sf, c_pdf = c_cdf.unsqueeze(-1), c_sf.unsqueeze(-1), c_pdf.unsqueeze(-1)
    du = c_cdf * p["du_cdf"] - c_sf * p["du_sf"] + c_pdf * p["du_pdf"]
    g_loc = _times(du, -p["inv_s"])
    g_log_scale = _times(du, -p["u"]) - c_pdf * p["resp_f"]
    g_logits = (c_cdf * p["resp_cdf"] + c_sf * p["resp_sf"] + c_pdf * p["resp_f"]
                - p["pi"] * (c_cdf + c_sf + c_pdf))
    return [-g_loc.sum(-1), g_logits, g_loc, g_log_scale]


def _prob_vjp(c_cdf, c_sf, c_pdf, q):
    """``vjp_assemble`` in probability space (``_prob_terms(..., for_vjp=True)``'s terms,
    which it overwrites). With A = c_F / F, B = c_S / (1 - F), C = c_f / f and the
    responsibilities pi C_k / F, pi (1 - C_k) / (1 - F), pi c_k / s_k / f:
    du_k = pi_k c_k (A - B) + C pi_k c_k / s_k (log c)'(u_k). The logits' terms stay
    separate (A pi C_k + B pi (1 - C_k), not (A - B) pi C_k + B pi_k: in a tail A or B is
    huge and that form cancels). ``c_cdf`` None: the density (c_F = c_S = 0)."""
    C = (c_pdf / q["f"]).unsqueeze(-1)
    cpc = q["pc"].mul_(C)
    du = q["dlog"].mul_(cpc)
    if c_cdf is None:
        g_logits = torch.addcmul(cpc, q["pi"], c_pdf.neg().unsqueeze(-1))
    else:
        A, B = (c_cdf / q["F"]).unsqueeze(-1), (c_sf / q["S"]).unsqueeze(-1)
        du.addcmul_(q["pcu"], A - B)
        g_logits = q["pw"].mul_(A).addcmul_(q["pwb"], B).add_(cpc).addcmul_(
            q["pi"], (c_cdf + c_sf + c_pdf).neg_().unsqueeze(-1))
    g_ls = q["u"].mul_(du).add_(cpc).neg_()
    g_loc = du.mul_(q["inv_s"]).neg_()
    return [g_loc.sum(-1).neg_(), g_logits, g_loc, g_ls]


def mixture_cdf_bwd(grad_y, grad_lad, x, logits, loc, log_scale, kind: str, output: str):
    """Vector-Jacobian product of the forward: grads to x, logits, loc, log_scale.

    Returned in the compute dtype, each with the shape of its (broadcast) input. Computed in
    probability space (``_prob_vjp``) where the forward is, and by the log-space formulas
    (``vjp_pieces``, ``vjp_assemble``) on the elements the forward sends there; the tests
    check both against autograd through the log-space forward.
    """
    with torch.no_grad():
        args = upcast(x, logits, loc, log_scale)
        gl = grad_lad.to(args[0].dtype)
        gy = gl if grad_y is None else grad_y.to(gl.dtype)
        q = _prob_terms(*args, kind, output, for_vjp=True)
        bad = _log_space_rows(q, output)
        if output == "density":
            grads = _prob_vjp(None, None, gl, q)
        else:
            # Only "unit" reads log F and log(1 - F) (which side of one half).
            logs = ({"log_F": torch.log(q["F"]), "log_S": torch.log(q["S"])}
                    if output == "unit" else None)
            grads = _prob_vjp(*output_coefs(gy, gl, logs, output), q)
        if bool(bad.any()):
            sub = [a[bad] for a in args]
            p = vjp_pieces(*sub, kind, output)
            fixed = vjp_assemble(*output_coefs(gy[bad], gl[bad], p, output), p)
            _limit_vjp(fixed, gy[bad], gl[bad], *sub, p, kind, output)
            # At x = +-inf the map is flat at its limits: no gradient to anything (else
            # inf * 0 = NaN would reach the shared parameters' sums).
            far = torch.isinf(sub[0])
            for g, g_bad in zip(grads, fixed, strict=True):
                g[bad] = g_bad.masked_fill(far if g_bad.dim() == 1 else far[:, None], 0.0)
        return grads


def _limit_vjp(grads, grad_y, grad_lad, x, logits, loc, log_scale, p, kind: str, output: str):
    """Overwrite, in ``grads`` (from ``vjp_assemble``), the elements whose f is 0 at a finite
    x with the limits of their gradients.

    There every component with pi > 0 lies beyond float range (u, or u^2 for the Gaussian,
    overflows): each C_k is exactly 0 or 1, the density's responsibilities are 0 / 0 and
    the formulas' products inf * 0. The component nearest in units of its scale,
    k* = argmin_k log|u_k| (delta: one-hot there, exact ties split by pi), dominates f and
    each tail sum that is 0, and with H = 1 (logistic) or |u*| (Gaussian):

    - log f: d/dx = -sign(u*) H / s*, d/dloc_k = -delta_k d/dx,
      d/dlog s_k = delta_k (|u*| H - 1) (the 1 is below the dtype's resolution there),
      d/dlogit = delta - pi.
    - "logit" with 1 - F = 0 (or F = 0): lad -> log H - log s* (``_saturated_logit_lad``):
      d/dx = 0 (1 / (x - loc*) Gaussian), d/dlog s_k = -delta_k (-2 delta_k); y -> +-inf:
      dy/dx = f / (F (1 - F)) = e^lad, dy/dloc_k = -delta_k e^lad,
      dy/dlog s_k = -delta_k u* H, dy/dlogit = sign(u*) (pi - delta).
    - components on both sides of x: F = sum_k pi_k C_k is constant in x, loc and log s;
      dy/dlogit = pi C / F - pi (1 - C) / (1 - F) ("logit") or pi (C - F) ("unit"), and the
      logit lad, log f - log F - log(1 - F), takes log f's gradient less those.

    Each product of a cotangent or delta with a limit is 0 where that factor is 0.
    """
    log_pi, u = standardize(x, logits, loc, log_scale)
    log_pdf = component_terms(u, kind)[2]
    dead = (torch.logsumexp(log_pi + log_pdf - log_scale, -1) == -math.inf) & torch.isfinite(x)
    if not bool(dead.any()):
        return
    gy, gl = grad_y[dead].unsqueeze(-1), grad_lad[dead].unsqueeze(-1)
    log_pi, loc, log_scale = log_pi[dead], loc[dead], log_scale[dead]
    d = x[dead].unsqueeze(-1) - loc
    log_u = torch.where(log_pi == -math.inf, math.inf, torch.log(d.abs()) - log_scale)
    nearest = log_u == log_u.amin(-1, keepdim=True)
    delta = torch.softmax(torch.where(nearest, log_pi, -math.inf), -1)
    pi = torch.exp(log_pi)
    # The nearest component's d, log|u| and log s, as (rows, 1) columns.
    d_n, log_u_n, ls_n = (_times(delta, v).sum(-1, keepdim=True)
                          for v in (d, log_u, log_scale))
    sign = torch.sign(d_n)
    log_h = log_u_n if kind == "gaussian" else torch.zeros_like(log_u_n)
    zero = torch.zeros_like(d_n)
    # (d/dx, d/dlog s of component k*, d/dlogit) of log f, lad and y.
    f_parts = (-sign * torch.exp(log_h - ls_n), torch.exp(log_u_n + log_h), delta - pi)
    if output == "density":
        lad_parts, y_parts = f_parts, None
    else:
        step = (d > 0).to(d.dtype)
        F = (pi * step).sum(-1, keepdim=True)
        if output == "unit":
            lad_parts, y_parts = f_parts, (zero, zero, pi * (step - F))
        else:
            # 1 - F summed on its own side, not formed by subtraction.
            pi_S = pi * (1.0 - step)
            resp_F, resp_S = pi * step / F, pi_S / pi_S.sum(-1, keepdim=True)
            y_parts = (zero, zero, resp_F - resp_S)
            lad_parts = (f_parts[0], f_parts[1], delta + pi - resp_F - resp_S)
            sat = ((p["log_F"] == -math.inf) | (p["log_S"] == -math.inf))[dead].unsqueeze(-1)
            if kind == "gaussian":
                sat_lad = (1.0 / d_n, -2.0 + zero, torch.zeros_like(pi))
            else:
                sat_lad = (zero, -1.0 + zero, torch.zeros_like(pi))
            e_lad = torch.exp(log_h - ls_n)
            sat_y = (e_lad, -sign * torch.exp(log_u_n + log_h), sign * (pi - delta))
            lad_parts = [torch.where(sat, a, b) for a, b in zip(sat_lad, lad_parts, strict=True)]
            y_parts = [torch.where(sat, a, b) for a, b in zip(sat_y, y_parts, strict=True)]
    parts = [(gl, lad_parts)] + ([] if y_parts is None else [(gy, y_parts)])
    g_x, g_ls, g_logits = zero, zero, torch.zeros_like(pi)
    for c, (dx, dls, dlogit) in parts:
        g_x = g_x + _times(c, dx)
        g_ls = g_ls + _times(c, dls)
        g_logits = g_logits + _times(c, dlogit)
    grads[0][dead] = g_x.squeeze(-1)
    grads[1][dead] = g_logits
    grads[2][dead] = _times(delta, -g_x)
    grads[3][dead] = _times(delta, g_ls)
