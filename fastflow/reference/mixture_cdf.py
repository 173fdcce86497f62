"""Pure-PyTorch mixture-CDF transform: the CPU path and the oracle for the Triton kernels.

Every function here takes tensors that are already validated and broadcast: ``x`` of shape
``S`` and parameters of shape ``S + (K,)`` (expanded views are fine), all of one floating
dtype. Half-precision inputs are computed in float32 and returned in their own dtype.

Two formulations of the forward and its VJP:

- log space (``_forward``, ``_vjp_pieces`` / ``_vjp_assemble``), the numerical contract of
  the design notes: log-sum-exps throughout, 1 - F never formed by subtraction, the logit
  log-derivative from the components' responsibilities and hazard rates so that it does not
  cancel in the tails. The oracle: the tests hold it to autograd, finite differences,
  quadrature and scipy, and the CPU path to it.
- probability space (``_prob_terms``, ``_prob_vjp``), what ``mixture_cdf_fwd`` /
  ``mixture_cdf_bwd`` run: F, 1 - F and f as sums of positive terms (each exact to a few
  ulps until its terms underflow) in a third of the passes over the components, with the
  elements where terms may have underflowed (far tails, tiny scales) or sums are not finite
  recomputed in log space.

Gradients are written out (the same formulas as the kernels, checked by the tests against
autograd through ``_forward`` and finite differences); gradients of the inverse use implicit
differentiation of the forward at the solution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
HALF_LOG_HALF_PI = 0.5 * math.log(0.5 * math.pi)
INV_SQRT2 = 1.0 / math.sqrt(2.0)

# Abramowitz & Stegun 26.2.23: the upper-tail normal quantile to |error| < 4.5e-4.
_AS_NUM = (2.515517, 0.802853, 0.010328)
_AS_DEN = (1.432788, 0.189269, 0.001308)
# Bracket padding, in units of a component's scale, covering that approximation's error.
GAUSS_BRACKET_PAD = 1e-3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gauss_log_hazard(u: torch.Tensor) -> torch.Tensor:
    """log(phi(u) / Phi(-u)), stable for all u (no cancellation for u >> 0)."""
    u_pos = u.clamp(min=0.0)
    pos = -torch.log(torch.special.erfcx(u_pos * INV_SQRT2)) - HALF_LOG_HALF_PI
    u_neg = u.clamp(max=0.0)
    neg = -0.5 * u_neg * u_neg - HALF_LOG_2PI - torch.special.log_ndtr(-u_neg)
    return torch.where(u >= 0, pos, neg)


def log_cdf_sf(u: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log C(u) and log(1 - C(u)) of the standard component."""
    if kind == "logistic":
        # softplus's default threshold (20) returns x itself above it, an error of e^-20
        # (2e-9) that float64 sees; at 40 the error is below float64's resolution.
        return -F.softplus(-u, threshold=40.0), -F.softplus(u, threshold=40.0)
    return torch.special.log_ndtr(u), torch.special.log_ndtr(-u)


def component_terms(u: torch.Tensor, kind: str):
    """(log C, log(1-C), log c, log c/(1-C), log c/C) of the standard component at u."""
    log_cdf, log_sf = log_cdf_sf(u, kind)
    if kind == "logistic":
        # c = C (1 - C): the hazard c/(1-C) is C and the reverse hazard c/C is 1-C.
        return log_cdf, log_sf, log_cdf + log_sf, log_cdf, log_sf
    log_pdf = -0.5 * u * u - HALF_LOG_2PI
    return log_cdf, log_sf, log_pdf, _gauss_log_hazard(u), _gauss_log_hazard(-u)


def _standardize(x, logits, loc, log_scale):
    """log pi and u = (x - loc) / s of the log-space formulas.

    Where 1/s = exp(-log_scale) overflows (log_scale below about -88.7 in float32, -709.8
    in float64) u is +-inf, and at x == loc the product is 0 * inf: u is exactly 0 there.
    Only that case is replaced, so autograd sees (x - loc) / s everywhere else.
    """
    log_pi = torch.log_softmax(logits, dim=-1)
    d = x.unsqueeze(-1) - loc
    inv_s = torch.exp(-log_scale)
    u = torch.where((d == 0) & torch.isinf(inv_s), 0.0, d * inv_s)
    return log_pi, u


def _upcast(*tensors):
    dtype = compute_dtype(tensors[0].dtype)
    return [t.to(dtype) for t in tensors]


def _forward(x, logits, loc, log_scale, kind: str, output: str):
    """The forward map in the compute dtype; autograd flows through it."""
    log_pi, u = _standardize(x, logits, loc, log_scale)
    log_cdf, log_sf, log_pdf, log_h_sf, log_h_cdf = component_terms(u, kind)
    log_f = torch.logsumexp(log_pi + log_pdf - log_scale, dim=-1)
    if output == "density":
        return None, log_f
    v_cdf = log_pi + log_cdf
    v_sf = log_pi + log_sf
    log_F = torch.logsumexp(v_cdf, dim=-1)
    log_S = torch.logsumexp(v_sf, dim=-1)
    if output == "unit":
        # F from whichever of F, 1-F is below one half, so that the value and its gradient
        # (dF = -(1-F) dlog(1-F)) stay exact in the upper tail.
        z = torch.where(log_F < -LOG_2, torch.exp(log_F), -torch.expm1(log_S))
        return z, log_f
    y = log_F - log_S
    # log(f / (1-F)) = logsumexp_k(resp_k(1-F) + log hazard_k - log s_k), and symmetrically.
    log_f_over_S = torch.logsumexp(_resp_hazard(v_sf, log_h_sf) - log_scale, dim=-1)
    log_f_over_F = torch.logsumexp(_resp_hazard(v_cdf, log_h_cdf) - log_scale, dim=-1)
    lad = torch.where(y > 0, log_f_over_S - log_F, log_f_over_F - log_S)
    return y, _saturated_logit_lad(lad, y, x, log_pi, loc, log_scale, kind)


def _resp_hazard(v, log_h):
    """log responsibility + log hazard of each component (v: log pi C or log pi (1 - C)).

    A component without responsibility adds nothing, also where its hazard is infinite (a
    Gaussian component at u = +-inf: -inf + inf): their product is pi c / s over the sum,
    and c is 0 there.
    """
    resp = torch.log_softmax(v, dim=-1)
    return torch.where(resp == -math.inf, -math.inf, resp + log_h)


def _saturated_logit_lad(lad, y, x, log_pi, loc, log_scale, kind: str):
    """The logit output's logabsdet where 1 - F (y = +inf) or F (y = -inf) is 0 at finite x.

    There every component with pi > 0 lies beyond float range on one side of x (1/s or u^2
    overflows), the responsibilities are 0 / 0 and the hazard form is NaN. The exact value
    is finite: the tail sum is dominated by the component with the smallest |u_k|,
    k* = argmin_k log|x - loc_k| - log s_k (taken without forming u), and f / (1 - F) tends
    to its hazard over its scale: lad = -log s_k* for the logistic (hazard -> 1) and
    log|x - loc_k*| - 2 log s_k* for the Gaussian (hazard -> |u|). Exact ties in log|u_k|
    take the smallest candidate. Written without data-dependent control flow (the fixed
    inverse schedule compiles as one graph); elsewhere the inputs to the logarithm are
    masked to 1 so that the unselected branch stays finite under autograd.
    """
    sat = torch.isinf(y) & torch.isfinite(x)
    d = torch.where(sat.unsqueeze(-1), x.unsqueeze(-1) - loc, 1.0)
    log_u = torch.where(log_pi == -math.inf, math.inf, torch.log(d.abs()) - log_scale)
    lim = -log_scale if kind == "logistic" else log_u - log_scale
    nearest = log_u == log_u.amin(-1, keepdim=True)
    lim = torch.where(nearest, lim, math.inf).amin(-1)
    return torch.where(sat, lim, lad)


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
    the log-space forward (``_forward``, the oracle the tests hold both to).
    """
    with torch.no_grad():
        args = _upcast(x, logits, loc, log_scale)
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
            y_bad, lad_bad = _forward(*(a[bad] for a in args), kind, output)
            lad[bad] = lad_bad
            if y is not None:
                y[bad] = y_bad
    return (None if y is None else y.to(x.dtype)), lad.to(x.dtype)


def _vjp_pieces(x, logits, loc, log_scale, kind: str, output: str):
    """Per-component pieces of the forward's VJP (the kernels' formulas, in PyTorch).

    Derivatives of log F, log(1-F) and log f with respect to u_k, weighted by each sum's
    responsibilities: d log F/du_k = a_k c_k/C_k, d log(1-F)/du_k = -b_k c_k/(1-C_k),
    d log f/du_k = r_k (log c)'(u_k); hazards come from their stable log forms.
    """
    log_pi, u = _standardize(x, logits, loc, log_scale)
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


def _output_coefs(grad_y, grad_lad, p, output: str):
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


def _vjp_assemble(c_cdf, c_sf, c_pdf, p):
    """Grads to (x, logits, loc, log_scale) from cotangents on (log F, log(1-F), log f)."""
    c_cdf, c_sf, c_pdf = c_cdf.unsqueeze(-1), c_sf.unsqueeze(-1), c_pdf.unsqueeze(-1)
    du = c_cdf * p["du_cdf"] - c_sf * p["du_sf"] + c_pdf * p["du_pdf"]
    g_loc = _times(du, -p["inv_s"])
    g_log_scale = _times(du, -p["u"]) - c_pdf * p["resp_f"]
    g_logits = (c_cdf * p["resp_cdf"] + c_sf * p["resp_sf"] + c_pdf * p["resp_f"]
                - p["pi"] * (c_cdf + c_sf + c_pdf))
    return [-g_loc.sum(-1), g_logits, g_loc, g_log_scale]


def _prob_vjp(c_cdf, c_sf, c_pdf, q):
    """``_vjp_assemble`` in probability space (``_prob_terms(..., for_vjp=True)``'s terms,
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
    (``_vjp_pieces``, ``_vjp_assemble``) on the elements the forward sends there; the tests
    check both against autograd through the log-space forward.
    """
    with torch.no_grad():
        args = _upcast(x, logits, loc, log_scale)
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
            grads = _prob_vjp(*_output_coefs(gy, gl, logs, output), q)
        if bool(bad.any()):
            sub = [a[bad] for a in args]
            p = _vjp_pieces(*sub, kind, output)
            fixed = _vjp_assemble(*_output_coefs(gy[bad], gl[bad], p, output), p)
            _limit_vjp(fixed, gy[bad], gl[bad], *sub, p, kind, output)
            for g, g_bad in zip(grads, fixed, strict=True):
                g[bad] = g_bad
        return grads


def _limit_vjp(grads, grad_y, grad_lad, x, logits, loc, log_scale, p, kind: str, output: str):
    """Overwrite, in ``grads`` (from ``_vjp_assemble``), the elements whose f is 0 at a finite
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
    log_pi, u = _standardize(x, logits, loc, log_scale)
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


def _logit_forward(x, log_pi, loc, inv_scale, kind):
    """logit F(x) only: the quantity bisection compares against the target."""
    log_cdf, log_sf = log_cdf_sf((x.unsqueeze(-1) - loc) * inv_scale, kind)
    return torch.logsumexp(log_pi + log_cdf, -1) - torch.logsumexp(log_pi + log_sf, -1)


def target_logit(y: torch.Tensor, output: str) -> torch.Tensor:
    """The target in logit space: y itself, or log z - log(1 - z) for unit targets."""
    if output == "logit":
        return y
    return torch.log(y) - torch.log1p(-y)


def component_quantile(t: torch.Tensor, kind: str) -> torch.Tensor:
    """u with logit C(u) = t for the standard component (Gaussian: to about 4.5e-4)."""
    if kind == "logistic":
        return t
    w = torch.sqrt(2.0 * F.softplus(t.abs()))
    num = _AS_NUM[0] + w * (_AS_NUM[1] + w * _AS_NUM[2])
    den = 1.0 + w * (_AS_DEN[0] + w * (_AS_DEN[1] + w * _AS_DEN[2]))
    return torch.sign(t) * (w - num / den)


def _bracket(z, scale, kind, dim):
    """(lo, hi, wide): [lo, hi] holding the root for a logit target t, from the components'
    own inverses z = loc + scale component_quantile(t) along ``dim`` (padded by
    GAUSS_BRACKET_PAD scales for the Gaussian quantile's approximation error). ``wide`` marks
    the elements where some end is not finite (a scale, or scale times the quantile, past the
    dtype's range): their bracket is the whole finite range, which :func:`_solve_wide`
    searches."""
    if kind == "gaussian":
        lo_k = torch.add(z, scale, alpha=-GAUSS_BRACKET_PAD)
        hi_k = torch.add(z, scale, alpha=GAUSS_BRACKET_PAD)
    else:
        lo_k = hi_k = z
    # inf * 0 (an infinite scale at the quantile 0) is NaN: that component allows any x.
    lo = lo_k.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).amin(dim)
    hi = hi_k.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf).amax(dim)
    wide = ~(torch.isfinite(lo) & torch.isfinite(hi))
    return lo, hi, wide


def _float_key(x: torch.Tensor) -> torch.Tensor:
    """An integer that orders as x does (its magnitude's bits, negated for negative x)."""
    bits = x.abs().view(torch.int64 if x.dtype == torch.float64 else torch.int32)
    return torch.where(x < 0, -bits, bits)


def _key_float(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float whose :func:`_float_key` is k."""
    value = k.abs().view(dtype)
    return torch.where(k < 0, -value, value)


def _solve_wide(t, logits, loc, log_scale, kind):
    """Roots of logit F(x) = t (flat finite targets (N,), parameters (N, K)) for brackets
    past the dtype's range: +-inf where F at half the largest finite float is still short of
    the target (or past it at minus that), otherwise bisection over the floats between in
    their integer order, which halves the count of floats in the bracket each step, so that one
    step per bit of the dtype leaves adjacent floats; the end whose residual is smaller is
    returned (forward-exact to the dtype)."""
    # Half the largest float: x - loc stays finite for any loc within the other half.
    big = 0.5 * torch.finfo(t.dtype).max
    log_pi = torch.log_softmax(logits, dim=-1)
    inv_scale = torch.exp(-log_scale)
    lo, hi = torch.full_like(t, -big), torch.full_like(t, big)
    h_lo = _logit_forward(lo, log_pi, loc, inv_scale, kind) - t
    h_hi = _logit_forward(hi, log_pi, loc, inv_scale, kind) - t
    bits = 64 if t.dtype == torch.float64 else 32
    for _ in range(bits):
        k_lo, k_hi = _float_key(lo), _float_key(hi)
        mid = _key_float((k_lo >> 1) + (k_hi >> 1) + (k_lo & k_hi & 1), t.dtype)
        h = _logit_forward(mid, log_pi, loc, inv_scale, kind) - t
        # An exact root closes the bracket on itself (on a flat map, the first one found).
        below, above = h <= 0, h >= 0
        lo, hi = torch.where(below, mid, lo), torch.where(above, mid, hi)
        h_lo, h_hi = torch.where(below, h, h_lo), torch.where(above, h, h_hi)
    x = torch.where(h_lo.abs() <= h_hi.abs(), lo, hi)
    x = torch.where(h_hi < 0, math.inf, x)
    return torch.where(h_lo > 0, -math.inf, x)


def _finish_inverse(x, t, lad, dtype):
    """The inverse's logabsdet from the forward's at x, and the boundary (+-inf) and NaN
    targets. An infinite x (a boundary target, or a root past the dtype's range) has
    logabsdet +inf."""
    lad = -lad
    x = torch.where(torch.isinf(t), t, x)
    lad = torch.where(torch.isinf(x), torch.full_like(lad, math.inf), lad)
    nan = torch.isnan(t)
    x = torch.where(nan, t, x)
    lad = torch.where(nan, t, lad)
    return x.to(dtype), lad.to(dtype)


def _solve_fixed(t, logits, loc, log_scale, kind, bisect_steps, newton_steps):
    """Root of logit F(x) = t in log space: bisection, then safeguarded Newton steps, each
    inside the bracket. Where an end of the final bracket has a residual at the rounding level
    of logit F, that end instead (the one with the smaller residual): a flat stretch of the
    map can put a sign change of the rounded residual an ulp from a steep rise, and the point
    inside such a bracket need not be near the root, while that end is forward-exact."""
    log_pi = torch.log_softmax(logits, dim=-1)
    inv_scale = torch.exp(-log_scale)
    scale = torch.exp(log_scale)
    lo, hi, wide = _bracket(loc + scale * component_quantile(t, kind).unsqueeze(-1), scale,
                            kind, -1)
    lo, hi = lo.masked_fill(wide, 0.0), hi.masked_fill(wide, 0.0)
    # The residuals at the bracket's ends (inf: not evaluated).
    h_lo = torch.full_like(lo, math.inf)
    h_hi = h_lo.clone()

    def narrow(x, h, lo, hi, h_lo, h_hi):
        below = h < 0
        return (torch.where(below, x, lo), torch.where(below, hi, x),
                torch.where(below, h, h_lo), torch.where(below, h_hi, h))

    for _ in range(bisect_steps):
        mid = 0.5 * lo + 0.5 * hi
        h = _logit_forward(mid, log_pi, loc, inv_scale, kind) - t
        lo, hi, h_lo, h_hi = narrow(mid, h, lo, hi, h_lo, h_hi)
    x = 0.5 * lo + 0.5 * hi
    for _ in range(newton_steps):
        g, lad = _forward(x, logits, loc, log_scale, kind, "logit")
        lo, hi, h_lo, h_hi = narrow(x, g - t, lo, hi, h_lo, h_hi)
        x_new = x - (g - t) * torch.exp(-lad)
        inside = (x_new > lo) & (x_new < hi)
        x = torch.where(inside, x_new, 0.5 * lo + 0.5 * hi)
    tol_h = 16.0 * torch.finfo(t.dtype).eps * t.abs().clamp(min=1.0)
    end = torch.where(h_lo.abs() <= h_hi.abs(), lo, hi)
    x = torch.where(torch.minimum(h_lo.abs(), h_hi.abs()) <= tol_h, end, x)
    wide &= torch.isfinite(t)
    if bool(wide.any()):
        x[wide] = _solve_wide(t[wide], logits[wide], loc[wide], log_scale[wide], kind)
    return x


def mixture_cdf_inverse_fixed(
    y, logits, loc, log_scale, kind: str, output: str, bisect_steps: int, newton_steps: int
):
    """A fixed schedule in log space: bisection steps in logit space, then safeguarded
    Newton steps (the kernels' earlier algorithm; now the CPU solver's fallback and a
    benchmark baseline). No data-dependent control flow (it compiles as one graph)."""
    with torch.no_grad():
        y_c, logits_c, loc_c, log_scale_c = _upcast(y, logits, loc, log_scale)
        t = target_logit(y_c, output)
        x = _solve_fixed(t, logits_c, loc_c, log_scale_c, kind, bisect_steps, newton_steps)
        _, lad = _forward(x, logits_c, loc_c, log_scale_c, kind, output)
        return _finish_inverse(x, t, lad, y.dtype)


def _logit_and_slope(x, pi, w_f, loc, inv_scale, kind):
    """logit F(x), its derivative f / (F (1 - F)) and f, with the component axis *first*:
    x (N,), parameters (K, N) (pi the weights, w_f = pi / s). F, 1 - F and f are each summed
    in probability space (each exact in its own tail; neither formed by subtraction)."""
    u = (x - loc).mul_(inv_scale)
    if kind == "logistic":
        c = torch.sigmoid(u)
        c_bar = u.neg_().sigmoid_()
        dens = c * c_bar
    else:
        # erfc, not torch.special.ndtr: ndtr goes through 1 + erf and is 0 below u = -8.
        c = torch.special.erfc(u * -INV_SQRT2).mul_(0.5)
        dens = (u * u).mul_(-0.5).exp_().mul_(math.exp(-HALF_LOG_2PI))
        c_bar = torch.special.erfc(u.mul_(INV_SQRT2)).mul_(0.5)
    cdf, sf = c.mul_(pi).sum(0), c_bar.mul_(pi).sum(0)
    f = dens.mul_(w_f).sum(0)
    return (cdf / sf).log_(), f / (cdf * sf), f


def _inverse_kn(t, logits, loc, log_scale, kind: str, output: str, max_steps: int,
                fallback_steps: tuple[int, int]):
    """The CPU solver on flat targets t (N,) (logit space, compute dtype) with the
    parameters' component axis first, (K, N): the layout in which a PyTorch CPU op over the
    components is a few row operations (a sum over a trailing axis of 8 costs twice as much,
    a broadcast of x four times). Returns (x, logabsdet) of the forward at x, both (N,)."""
    finfo = torch.finfo(t.dtype)
    eps = finfo.eps
    # Beyond this |logit| the tail mass nears the dtype's smallest normal number: those
    # targets (and any element that has not converged) go to the log-space solver.
    plain = t.abs() <= -0.85 * math.log(finfo.tiny)
    pi = torch.softmax(logits, dim=0)
    scale = torch.exp(log_scale)
    inv_scale = scale.reciprocal()
    w_f = pi * inv_scale
    t_plain = torch.where(plain, t, 0.0)
    # The bracket from the components' own inverses z_k; the start: their pi-weighted mean.
    z = torch.addcmul(loc, scale, component_quantile(t_plain, kind))
    lo, hi, wide = _bracket(z, scale, kind, 0)
    # Brackets past the dtype's range go to the log-space solver, which handles them.
    plain &= ~wide
    t_plain = torch.where(plain, t, 0.0)
    lo, hi = lo.masked_fill(~plain, 0.0), hi.masked_fill(~plain, 0.0)
    x = z.mul_(pi).sum(0).clamp_(lo, hi)
    s_min = scale.amin(0)
    tol_newton = 0.25 * math.sqrt(eps) * s_min
    # The rounding level of logit F's evaluation (a few ulps of max(1, |t|)).
    tol_h = 16.0 * eps * t_plain.abs().clamp(min=1.0)
    dx_old = hi - lo
    dx = dx_old
    # The residuals at the bracket's ends (inf: not evaluated).
    h_lo = torch.full_like(x, math.inf)
    h_hi = h_lo.clone()
    active = plain.clone()
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        g, slope, _ = _logit_and_slope(x, pi, w_f, loc, inv_scale, kind)
        h = g - t_plain
        below = h < 0
        lo, hi = torch.where(below, x, lo), torch.where(below, hi, x)
        h_lo, h_hi = torch.where(below, h, h_lo), torch.where(below, h_hi, h)
        d = h / slope
        newton = x - d
        inside = (newton >= lo) & (newton <= hi)
        use_newton = inside & (2.0 * d.abs() <= dx_old)
        # Converged: an exact root; Newton's step within tol_newton (x is smooth on that
        # scale: the next error is about eps s_min); a step within a few ulps (`ulps`) from a
        # residual at the rounding level (the step either stays on x's side of the root,
        # where the residual is smaller still, or passes the root, within the step of it);
        # or the bracket within two `ulps`. There x moves to Newton's estimate inside the
        # bracket, or, where an end's residual is at the rounding level, to the end with the
        # smaller residual: in float32 a flat stretch of the map can put a sign change of
        # the rounded residual a few ulps from a steep rise that the bracket also spans, so
        # such a bracket need not hold the root, while that end is forward-exact. A step of
        # a few ulps alone proves nothing: on the steep edge of a plateau (a narrow
        # component's tail below the light components' mass) Newton's step is a few ulps
        # while the root lies far beyond.
        ulps = (x.abs() + s_min).mul_(4.0 * eps)
        short = use_newton & (d.abs() <= ulps)
        converged = (use_newton & (d.abs() <= tol_newton)) | (short & (h.abs() <= tol_h))
        closed = hi - lo <= 2.0 * ulps
        done = converged | closed | (h == 0)
        # Any other step of a few ulps goes half an `ulps` further, so that if the root lies
        # within it the next evaluation lands beyond the root and the bracket closes.
        over = short & ~done
        newton = torch.where(over, newton - d.sign() * 0.5 * ulps, newton)
        x_next = torch.where(use_newton, newton, torch.lerp(lo, hi, 0.5))
        h_far = torch.where(below, h_hi, h_lo).abs()
        x_end = torch.where(h.abs() <= h_far, x, torch.where(below, hi, lo))
        x_end = torch.where(inside & (torch.minimum(h.abs(), h_far) > tol_h), x - d, x_end)
        x_next = torch.where(closed & ~converged, x_end, x_next)
        step = (x_next - x).abs()
        x = torch.where(active & (h != 0), x_next, x)
        dx_old, dx = torch.where(active, dx, dx_old), torch.where(active, step, dx)
        active &= ~done
    rest = (active | ~plain) & torch.isfinite(t)
    if bool(rest.any()):
        cols = (logits[:, rest].T, loc[:, rest].T, log_scale[:, rest].T)
        x[rest] = _solve_fixed(t[rest], *cols, kind, fallback_steps[0], fallback_steps[1])
    # The forward logabsdet at x: log f, or log(f / (F (1 - F))) formed as one quotient
    # (no cancellation); in log space wherever f is too small for that.
    _, slope, dens = _logit_and_slope(x, pi, w_f, loc, inv_scale, kind)
    lad = torch.log(slope if output == "logit" else dens)
    redo = rest | ~(dens > 1e8 * finfo.tiny)
    if bool(redo.any()):
        cols = (logits[:, redo].T, loc[:, redo].T, log_scale[:, redo].T)
        lad[redo] = _forward(x[redo], *cols, kind, output)[1]
    return x, lad


def mixture_cdf_inverse_fwd(y, logits, loc, log_scale, kind: str, output: str,
                            max_steps: int = 60, fallback_steps: tuple[int, int] = (60, 4)):
    """x with forward(x) = y, by safeguarded Newton iteration run to convergence.

    The CPU path. Newton's method on logit F(x) = t, with F and 1 - F summed in probability
    space (cheap, and each exact in its own tail), kept inside the bracket of the components'
    own inverses and falling back to bisection whenever a step leaves the bracket or fails to
    halve (Numerical Recipes' rtsafe). An element stops once its Newton step is below
    sqrt(eps)/4 of the smallest component scale (the next error is then about eps of it), its
    step is below 4 eps (|x| + that scale) from a residual at the rounding level, or its
    bracket is below 8 eps (|x| + that scale) wide; any other step that short goes
    2 eps (|x| + that scale) further, so that the next evaluation closes the bracket if the
    root is that near. Typically 3-6 evaluations instead of a fixed schedule's 44 (the kernels
    iterate the same way, in log space, per tile). Targets so far out that the tail mass nears
    underflow, and any element still unconverged after ``max_steps``, are solved in log space
    by the fixed schedule (:func:`mixture_cdf_inverse_fixed`). The logabsdet is taken in log
    space at the solution. Returns (x, logabsdet) with logabsdet = log|dx/dy| = -forward
    logabsdet at x.
    """
    with torch.no_grad():
        y_c, logits_c, loc_c, log_scale_c = _upcast(y, logits, loc, log_scale)
        K = logits_c.shape[-1]
        params = (p.reshape(-1, K).T.contiguous() for p in (logits_c, loc_c, log_scale_c))
        x, lad = inverse_component_major(y_c.reshape(-1), *params, kind, output, max_steps,
                                         fallback_steps)
        return x.view(y.shape).to(y.dtype), lad.view(y.shape).to(y.dtype)


def inverse_component_major(y, logits, loc, log_scale, kind: str, output: str,
                            max_steps: int = 60, fallback_steps: tuple[int, int] = (60, 4)):
    """:func:`mixture_cdf_inverse_fwd` on flat targets y (N,) with the parameters'
    component axis first, (K, N), all in the compute dtype (the autoregressive solve's
    GEMM produces them so). Returns (x, logabsdet), (N,) each."""
    t = target_logit(y, output)
    x, lad = _inverse_kn(t, logits, loc, log_scale, kind, output, max_steps, fallback_steps)
    return _finish_inverse(x, t, lad, y.dtype)


def mixture_cdf_inverse_bwd(
    grad_x, grad_lad, x, logits, loc, log_scale, kind: str, output: str
):
    """VJP of the inverse by implicit differentiation, at its solution x.

    With g the forward map and L = -log g'(x): dL/dy and dL/dtheta follow from
    dx/dy = 1/g'(x) and dx/dtheta = -(dg/dtheta)/g'(x). Returns grads to y, logits, loc,
    log_scale in the compute dtype; zero where x is infinite (the boundary targets).
    """
    with torch.no_grad():
        x, logits, loc, log_scale = _upcast(x, logits, loc, log_scale)
        finite = torch.isfinite(x)
        x = torch.where(finite, x, 0.0)
        _, lad = _forward(x, logits, loc, log_scale, kind, output)
        p = _vjp_pieces(x, logits, loc, log_scale, kind, output)
        ones, zero = torch.ones_like(lad), torch.zeros_like(lad)
        dlad_dx = _vjp_assemble(*_output_coefs(zero, ones, p, output), p)[0]
        cx = torch.where(finite, grad_x.to(lad.dtype), 0.0)
        cl = torch.where(finite, grad_lad.to(lad.dtype), 0.0)
        w = torch.where(finite, (cx - cl * dlad_dx) * torch.exp(-lad), 0.0)
        return [w, *_vjp_assemble(*_output_coefs(-w, -cl, p, output), p)[1:]]
