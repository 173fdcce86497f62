"""The CPU path of the mixture-CDF inverse and its VJP in plain PyTorch, held to the
oracle (:mod:`fastflow.reference.naive`) by the tests.

Takes validated, broadcast tensors as :mod:`fastflow.reference.mixture_cdf` does. The inverse
runs safeguarded Newton iteration to convergence on a component-major layout, falling back to
the oracle's log-space bisection (:func:`fastflow.reference.naive.solve_bisect`) where Newton
cannot go; its gradients use implicit differentiation of the
forward at the solution (the forward's written-out VJP pieces).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from . import naive
from .mixture_cdf import output_coefs, vjp_assemble, vjp_pieces
from .naive import (
    HALF_LOG_2PI,
    INV_SQRT2,
    bracket,
    component_quantile,
    finish_inverse,
    solve_bisect,
    target_logit,
    upcast,
)


@functools.lru_cache
def _constants(dtype, device):
    """The solve's constants as 0-dim tensors of the compute dtype on the data's device: a
    Python number in a tensor op is converted to a tensor on every call, a cost that shows at
    the sampler's sizes. (Never written to.)"""
    finfo = torch.finfo(dtype)

    def const(value):
        return torch.tensor(value, dtype=dtype, device=device)

    return SimpleNamespace(
        zero=const(0.0),
        # Beyond this |logit| the tail mass nears the dtype's smallest normal number.
        plain_limit=const(-0.85 * math.log(finfo.tiny)),
        newton_tol=const(0.25 * math.sqrt(finfo.eps)),
        ulps_hi=const(8.0 * finfo.eps),
        tiny_f=const(1e8 * finfo.tiny),
    )


def _evaluator(pi, w_f, loc, inv_scale, kind):
    """Functions of the mixture with the component axis *first*, parameters (K, N) (pi the
    weights, w_f = pi / s): ``evaluate(x)`` for x (N,) returns (logit F(x), its derivative
    f / (F (1 - F)), f, F, 1 - F), with F, 1 - F and f each summed in probability space
    (each exact in its own tail; neither formed by subtraction); ``density_slope(x)`` returns
    f'(x) from the component terms of the last ``evaluate(x)``. The three terms share one
    (3, K, N) buffer, weighted and summed over the components in one op each: the solve
    calls this a few times per sampling step on a few thousand elements, where each op's
    fixed cost counts."""
    work, weighted = loc.new_empty((2, 3, *loc.shape)).unbind(0)
    if kind == "gaussian":
        # erfc's factor 1/2 and the density's 1 / sqrt(2 pi), in the weights.
        pi, w_f = 0.5 * pi, w_f * math.exp(-HALF_LOG_2PI)
    u, u_neg, dens = work.unbind(0)
    tails = work[:2]

    def evaluate(x):
        torch.sub(x, loc, out=u).mul_(inv_scale)
        if kind == "logistic":
            torch.neg(u, out=u_neg)
            tails.sigmoid_()
            torch.mul(u, u_neg, out=dens)
        else:
            # erfc, not torch.special.ndtr: ndtr goes through 1 + erf and is 0 below u = -8.
            torch.mul(u, u, out=dens).mul_(-0.5).exp_()
            u.mul_(-INV_SQRT2)
            torch.neg(u, out=u_neg)
            tails.erfc_()
        torch.mul(tails, pi, out=weighted[:2])
        torch.mul(dens, w_f, out=weighted[2])
        cdf, sf, f = weighted.sum(1).unbind(0)
        return (cdf / sf).log_(), f / (cdf * sf), f, cdf, sf

    def density_slope(x):
        # Each component density's derivative, over its scale: logistic
        # c (1 - c) (1 - 2 c) = dens (c_bar - c) (tails hold c, c_bar); Gaussian -u phi(u).
        if kind == "logistic":
            terms = torch.sub(u_neg, u).mul_(dens)
        else:
            terms = torch.sub(loc, x).mul_(inv_scale).mul_(dens)
        return terms.mul_(w_f).mul_(inv_scale).sum(0)

    return evaluate, density_slope


def _near_root_step(x, h, d, newton, lo, hi, h_lo, h_hi, below, inside, use_newton,
                    converged, s_min, t_plain, eps):
    """The iteration's full rule for a step that may end at the rounding level: returns
    (x_next, done). Converged: an exact root; Newton's step within tol_newton (passed in as
    ``converged``: x is smooth on that scale, the next error is about eps s_min); a step
    within a few ulps (``ulps``) from a residual at the rounding level (``tol_h``: x stays,
    forward-exact, and within the step of the root where the map is smooth); or the bracket
    within two ``ulps``. There x moves to
    Newton's estimate inside the bracket, or, where an end's residual is at the rounding
    level, to the end with the smaller residual: in float32 a flat stretch of the map can put
    a sign change of the rounded residual a few ulps from a steep rise that the bracket also
    spans, so such a bracket need not hold the root, while that end is forward-exact. A step
    of a few ulps alone proves nothing: on the steep edge of a plateau (a narrow component's
    tail below the light components' mass) Newton's step is a few ulps while the root lies
    far beyond, so any other step that short goes half an ``ulps`` further: if the root lies
    within it, the next evaluation lands beyond the root and the bracket closes."""
    ad, h_abs = d.abs(), h.abs()
    ulps = (x.abs() + s_min).mul_(4.0 * eps)
    # The rounding level of logit F's evaluation (a few ulps of max(1, |t|)).
    tol_h = 16.0 * eps * t_plain.abs().clamp(min=1.0)
    short = use_newton & (ad <= ulps)
    # x itself is at the rounding level: it stays (the step could cross the steep rise of a
    # narrow component beside a plateau at the target's level and end far from the level).
    stays = short & (h_abs <= tol_h) & ~converged
    converged = converged | stays
    closed = hi - lo <= 2.0 * ulps
    done = converged | closed | (h == 0)
    over = short & ~done
    newton_over = torch.where(over, newton - d.sign() * 0.5 * ulps, newton)
    x_next = torch.where(use_newton, newton_over, torch.lerp(lo, hi, 0.5))
    h_far = torch.where(below, h_hi, h_lo).abs()
    x_end = torch.where(h_abs <= h_far, x, torch.where(below, hi, lo))
    x_end = torch.where(inside & (torch.minimum(h_abs, h_far) > tol_h), newton, x_end)
    x_next = torch.where(closed & ~converged, x_end, x_next)
    # An exact root stays (its Newton step may be 0 / 0).
    return torch.where((h != 0) & ~stays, x_next, x), done


def _inverse_kn(t, logits, loc, log_scale, kind: str, output: str, max_steps: int):
    """The CPU solver on flat targets t (N,) (logit space, compute dtype) with the
    parameters' component axis first, (K, N): the layout in which a PyTorch CPU op over the
    components is a few row operations (a sum over a trailing axis of 8 costs twice as much,
    a broadcast of x four times). Returns (x, logabsdet) of the forward at x, both (N,), and
    whether every target was finite and solved by the iteration (no boundary or NaN target,
    no fallback): then x is finite and :func:`naive.finish_inverse` has nothing to do.

    The solve is op-bound at the autoregressive sampler's sizes (a few thousand elements per
    call), so an iteration's common path is kept to few tensor ops: the rules for a step near
    the rounding level (:func:`_near_root_step`) run only when some element can meet them,
    by a test that every such element passes (see ``ulps_hi``)."""
    finfo = torch.finfo(t.dtype)
    eps = finfo.eps
    # Beyond this |logit| the tail mass nears the dtype's smallest normal number: those
    # targets (and any element that has not converged) go to the log-space solver.
    c = _constants(t.dtype, t.device)
    plain = t.abs() <= c.plain_limit
    pi = torch.softmax(logits, dim=0)
    scale = torch.exp(log_scale)
    inv_scale = scale.reciprocal()
    w_f = pi * inv_scale
    t_plain = torch.where(plain, t, c.zero)
    # The bracket from the components' own inverses z_k; the start: their pi-weighted mean.
    z = torch.addcmul(loc, scale, component_quantile(t_plain, kind))
    lo, hi, wide = bracket(z, scale, kind, 0)
    # Brackets past the dtype's range go to the log-space solver, which handles them; their
    # non-finite values here stay in elements that never iterate.
    plain &= ~wide
    x = z.mul_(pi).sum(0).clamp_(lo, hi)
    s_min = scale.amin(0)
    tol_newton = s_min * c.newton_tol
    # An upper bound on _near_root_step's ulps = 4 eps (|x| + s_min) for every x the
    # iteration visits: x stays in the first bracket [lo, hi], where |x| <= max(-lo, hi),
    # but for pushes of half an ulps, far below that bound + s_min (rounding is monotone,
    # so the bound holds as computed). A step longer than it in a bracket wider than twice
    # it meets none of that function's rules.
    ulps_hi = torch.maximum(lo.neg(), hi).add_(s_min).mul_(c.ulps_hi)
    closed_hi = ulps_hi + ulps_hi
    dx_old = hi - lo
    dx = dx_old
    evaluate, density_slope = _evaluator(pi, w_f, loc, inv_scale, kind)
    # Each iteration's (below, h), from which _near_root_step's residuals at the bracket's
    # ends are brought up to date only when it runs (inf: an end not evaluated).
    history = []
    h_ends = [torch.full_like(x, math.inf)] * 2
    active = plain
    plain_all = bool(plain.all())
    converging = False
    lad = None
    for _ in range(max_steps):
        if not bool(active.any()):
            converging = True
            break
        g, slope, dens, cdf, sf = evaluate(x)
        h = g - t_plain
        below = h < c.zero
        lo, hi = torch.where(below, x, lo), torch.where(below, hi, x)
        history.append((below, h))
        d = h / slope
        ad = d.abs()
        newton = x - d
        inside = (newton >= lo) & (newton <= hi)
        use_newton = inside & (ad + ad <= dx_old)
        converged = use_newton & (ad <= tol_newton)
        staying = active & ~converged
        # NaN steps (0 / 0 at an exact root on a flat stretch) count as near.
        near = ~((ad > ulps_hi) & (hi - lo > closed_hi))
        if bool((near & staying).any()):
            for past_below, past_h in history:
                h_ends = [torch.where(past_below, past_h, h_ends[0]),
                          torch.where(past_below, h_ends[1], past_h)]
            history.clear()
            x_next, done = _near_root_step(x, h, d, newton, lo, hi, *h_ends, below, inside,
                                           use_newton, converged, s_min, t_plain, eps)
            staying = active & ~done
        elif plain_all and not bool(staying.any()):
            # Every element is at its solution: those active here converged by Newton's
            # step d <= tol_newton, the others were evaluated at their final x. The active
            # ones' logabsdet at their new x is the one at x plus the step times its
            # derivative (the error, the step squared over 2 times the second derivative, is
            # below eps for such steps), which saves the evaluation at the solutions. The
            # step is the one taken, x - d rounded, not d: for a narrow component half an
            # ulp of x times the derivative (about u / s) is far above eps.
            lad = torch.log(slope if output == "logit" else dens)
            lad_slope = density_slope(x).div_(dens)
            if output == "logit":  # d/dx log(f / (F (1 - F))) = f'/f - f/F + f/(1 - F)
                lad_slope.sub_(dens / cdf).add_(dens / sf)
            x_new = torch.where(active, newton, x)
            lad = torch.where(active, lad + (x_new - x) * lad_slope, lad)
            x = x_new
            converging = True
            break
        else:
            x_next = torch.where(use_newton, newton, torch.lerp(lo, hi, 0.5))
        # Inactive elements' step sizes are never read again.
        dx_old, dx = dx, (x_next - x).abs()
        x = torch.where(active, x_next, x)
        active = staying
    clean = converging and plain_all
    if lad is None:
        if not clean:
            rest = (active | ~plain) & torch.isfinite(t)
            if bool(rest.any()):
                cols = (logits[:, rest].T, loc[:, rest].T, log_scale[:, rest].T)
                x[rest] = solve_bisect(t[rest], *cols, kind)
        # The forward logabsdet at x: log f, or log(f / (F (1 - F))) formed as one
        # quotient (no cancellation); in log space wherever f is too small for that.
        _, slope, dens, _, _ = evaluate(x)
        lad = torch.log(slope if output == "logit" else dens)
    # (An x that is not finite has f = 0 here, and is not clean. Where the last iteration
    # gave the logabsdet, f is the one at the last iterate, within 1e-4 of the solution's.)
    redo = ~(dens > c.tiny_f)
    if not clean:
        redo |= rest
    if bool(redo.any()):
        clean = False
        cols = (logits[:, redo].T, loc[:, redo].T, log_scale[:, redo].T)
        lad[redo] = naive.forward(x[redo], *cols, kind, output)[1]
    return x, lad, clean


def mixture_cdf_inverse_fwd(y, logits, loc, log_scale, kind: str, output: str,
                            max_steps: int = 60):
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
    take safeguarded Halley steps on logit F, evaluated in log space, per tile). Targets so far
    out that the tail mass nears underflow, brackets past the dtype's range, and any element
    still unconverged after ``max_steps`` (a bracket many orders of magnitude wider than the
    smallest scale, which halving does not resolve in that many steps), are solved in log space
    by bisection in the floats' integer order (:func:`fastflow.reference.naive.solve_bisect`:
    one step per bit of the dtype, however wide the bracket). The logabsdet is taken in log space at
    the solution. Returns (x, logabsdet) with logabsdet = log|dx/dy| = -forward
    logabsdet at x.
    """
    with torch.no_grad():
        y_c, logits_c, loc_c, log_scale_c = upcast(y, logits, loc, log_scale)
        K = logits_c.shape[-1]
        params = (p.reshape(-1, K).T.contiguous() for p in (logits_c, loc_c, log_scale_c))
        x, lad = inverse_component_major(y_c.reshape(-1), *params, kind, output, max_steps)
        return x.view(y.shape).to(y.dtype), lad.view(y.shape).to(y.dtype)


def inverse_component_major(y, logits, loc, log_scale, kind: str, output: str,
                            max_steps: int = 60, check_nan: bool = True):
    """:func:`mixture_cdf_inverse_fwd` on flat targets y (N,) with the parameters'
    component axis first, (K, N), all in the compute dtype (the autoregressive solve's
    GEMM produces them so). Returns (x, logabsdet), (N,) each."""
    t = target_logit(y, output)
    x, lad, clean = _inverse_kn(t, logits, loc, log_scale, kind, output, max_steps)
    if clean:
        x, lad = x.to(y.dtype), lad.neg_().to(y.dtype)
    else:
        x, lad = finish_inverse(x, t, lad, y.dtype)
    # NaN parameters (no check refuses them with validation off) give NaN, not the
    # plausible number the iteration stops at. (The autoregressive solve, whose per-step
    # calls this would slow by some 8%, checks its weights once instead: ``check_nan``.)
    if not check_nan:
        return x, lad
    nan = ((logits != logits) | (loc != loc) | (log_scale != log_scale)).any(0)
    return x.masked_fill(nan, math.nan), lad.masked_fill(nan, math.nan)


def mixture_cdf_inverse_bwd(
    grad_x, grad_lad, x, logits, loc, log_scale, kind: str, output: str
):
    """VJP of the inverse by implicit differentiation, at its solution x.

    With g the forward map and L = -log g'(x): dL/dy and dL/dtheta follow from
    dx/dy = 1/g'(x) and dx/dtheta = -(dg/dtheta)/g'(x). Returns grads to y, logits, loc,
    log_scale in the compute dtype; zero where x is infinite (the boundary targets).
    """
    with torch.no_grad():
        x, logits, loc, log_scale = upcast(x, logits, loc, log_scale)
        finite = torch.isfinite(x)
        x = torch.where(finite, x, 0.0)
        _, lad = naive.forward(x, logits, loc, log_scale, kind, output)
        p = vjp_pieces(x, logits, loc, log_scale, kind, output)
        ones, zero = torch.ones_like(lad), torch.zeros_like(lad)
        dlad_dx = vjp_assemble(*output_coefs(zero, ones, p, output), p)[0]
        cx = torch.where(finite, grad_x.to(lad.dtype), 0.0)
        cl = torch.where(finite, grad_lad.to(lad.dtype), 0.0)
        w = torch.where(finite, (cx - cl * dlad_dx) * torch.exp(-lad), 0.0)
        return [w, *vjp_assemble(*output_coefs(-w, -cl, p, output), p)[1:]]
