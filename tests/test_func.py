"""torch.func transforms (vmap, grad, jacrev, jacfwd, hessian) and higher derivatives of the
public ops and of flows, on both backends, against plain autograd, autograd through the
reference's log-space forward, the inverse-function rule and finite differences."""

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import fastflow
import fastflow.ops as fastflow_ops
from fastflow.distributions import StandardNormal
from fastflow.nn import AutoregressiveMixtureFlow, Flow, MixtureCDFFlow, Reverse
from fastflow.reference import naive

from helpers import random_mixture, sample_x

F64 = torch.float64
CASES = [(k, o) for k in ("logistic", "gaussian") for o in ("unit", "logit")]
CASE_IDS = [f"{k}-{o}" for k, o in CASES]
OPS = ("mixture_cdf", "mixture_cdf_inverse", "mixture_log_prob")


pytestmark = pytest.mark.usefixtures("one_thread")


def _op(name, kind, output):
    """The public op as a function of (input, logits, loc, log_scale), outputs as a tuple."""
    if name == "mixture_cdf":
        return lambda a, *p: fastflow.mixture_cdf(a, *p, kind=kind, output=output)
    if name == "mixture_cdf_inverse":
        return lambda a, *p: fastflow.mixture_cdf_inverse(a, *p, kind=kind, output=output)
    return lambda a, *p: (fastflow.mixture_log_prob(a, *p, kind=kind),)


def _problem(name, kind, output, shape=(4, 3), K=2):
    """(input, params) in float64: x around the components, or the targets y = F(x) for the
    inverse; parameters shared across the leading dimension (broadcast)."""
    params = random_mixture(shape, K, dtype=F64, shared=True)
    x = sample_x(*params, shape, 2.0)
    if name == "mixture_cdf_inverse":
        x = fastflow.mixture_cdf(x, *params, kind=kind, output=output)[0]
    return x, params


def _weights(outs):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]


def _scalar(fn, weights):
    """A random linear functional of fn's outputs: a scalar loss."""
    return lambda *args: sum((o * w).sum() for o, w in zip(fn(*args), weights, strict=True))


def _close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9, **kw)


def _assert_all_close(got, want):
    for g, w in zip(got, want, strict=True):
        _close(g, w)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("kind,output", CASES, ids=CASE_IDS)
def test_vmap_matches_the_batched_call(backend, name, kind, output):
    """vmap over x, over the parameters (a batch of mixtures) or over both gives what one
    call on the batch gives: each op runs once on the whole batch (its batching rule), and
    the value checks, whose host sync a batched tensor cannot serve, are skipped."""
    fn = _op(name, kind, output)
    a, (logits, loc, log_scale) = _problem(name, kind, output)
    _assert_all_close(vmap(lambda ai: fn(ai, logits, loc, log_scale))(a),
                      fn(a, logits, loc, log_scale))
    # A batch of mixtures (loc per row), with x batched and not.
    locs = loc + 0.1 * torch.randn(a.shape[0], *loc.shape, dtype=F64)
    _assert_all_close(vmap(lambda ai, li: fn(ai, logits, li, log_scale))(a, locs),
                      fn(a, logits, locs, log_scale))
    _assert_all_close(vmap(lambda li: fn(a[0], logits, li, log_scale))(locs),
                      fn(a[0].expand_as(a), logits, locs, log_scale))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("kind,output", CASES, ids=CASE_IDS)
def test_vmap_grad_and_jacrev_match_autograd(backend, name, kind, output):
    """Per-sample gradients (vmap of grad) and Jacobians (jacrev) with respect to the input
    and the parameters equal plain autograd's, per sample and by
    torch.autograd.functional.jacobian."""
    fn = _op(name, kind, output)
    a, params = _problem(name, kind, output)
    weights = [w[0] for w in _weights(fn(a, *params))]
    loss = _scalar(fn, weights)
    per_sample = vmap(grad(loss, argnums=(0, 1, 2, 3)), in_dims=(0, None, None, None))(
        a, *params)
    for i in range(a.shape[0]):
        leaves = [t.clone().requires_grad_() for t in (a[i], *params)]
        want = torch.autograd.grad(loss(*leaves), leaves)
        _assert_all_close([got[i] for got in per_sample], want)
    got = jacrev(fn, argnums=(0, 1, 2, 3))(a, *params)
    want = torch.autograd.functional.jacobian(fn, (a, *params))
    for got_out, want_out in zip(got, want, strict=True):
        _assert_all_close(got_out, want_out)


@pytest.mark.parametrize("kind,output", CASES, ids=CASE_IDS)
def test_hessians_match_autograd_through_the_log_space_forward(backend, kind, output):
    """Second derivatives of the forward and the density, by torch.func.hessian (forward
    over reverse), jacrev(jacrev) and plain autograd with create_graph=True, equal those of
    plain autograd through the reference's log-space forward."""
    for name, out in (("mixture_cdf", output), ("mixture_log_prob", "density")):
        fn = _op(name, kind, output)
        x, params = _problem(name, kind, output, shape=(3, 2))
        weights = _weights(fn(x, *params))
        loss = _scalar(fn, weights)

        def oracle(x, logits, loc, log_scale, out=out):
            full = [p.expand(*x.shape, p.shape[-1]) for p in (logits, loc, log_scale)]
            y, lad = naive.forward(x, *full, kind, out)
            return (lad,) if y is None else (y, lad)

        want = torch.autograd.functional.hessian(_scalar(oracle, weights), (x, *params))
        for how in (hessian, lambda f, **kw: jacrev(jacrev(f, **kw), **kw)):
            got = how(loss, argnums=(0, 1, 2, 3))(x, *params)
            for got_row, want_row in zip(got, want, strict=True):
                for g, w in zip(got_row, want_row, strict=True):
                    _close(g, w)
        got = torch.autograd.functional.hessian(loss, (x, *params))
        for got_row, want_row in zip(got, want, strict=True):
            for g, w in zip(got_row, want_row, strict=True):
                _close(g, w)


@pytest.mark.parametrize("kind,output", CASES, ids=CASE_IDS)
def test_inverse_second_derivatives_follow_the_inverse_function_rule(backend, kind, output):
    """With g the forward map and x = g^-1(y): dx/dy = 1/g'(x), d2x/dy2 = -g''/g'^3, and the
    inverse's logabsdet L = -log g'(x) has dL/dy = -h'/g', d2L/dy2 = -(h''/g' - h' g''/g'^2)/g'
    with h = log g' (derivatives of g and h by autograd through the log-space forward)."""
    y, params = _problem("mixture_cdf_inverse", kind, output, shape=(5,))
    x = fastflow.mixture_cdf_inverse(y, *params, kind=kind, output=output)[0].detach()
    full = [p.expand(*x.shape, p.shape[-1]) for p in params]
    xr = x.clone().requires_grad_()
    g, h = naive.forward(xr, *full, kind, output)
    g1, h1 = (torch.autograd.grad(t.sum(), xr, create_graph=True)[0] for t in (g, h))
    g2, h2 = (torch.autograd.grad(t.sum(), xr, create_graph=True)[0] for t in (g1, h1))
    want_x = -g2 / g1**3
    want_lad = -(h2 / g1 - h1 * g2 / g1**2) / g1

    def second(which):
        def f(ti, *pi):
            return fastflow.mixture_cdf_inverse(ti, *pi, kind=kind, output=output)[which]
        return vmap(grad(grad(f)))(y, *params)

    torch.testing.assert_close(second(0), want_x.detach(), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(second(1), want_lad.detach(), rtol=1e-6, atol=1e-10)
    # and by plain autograd (create_graph) on the whole batch
    yr = y.clone().requires_grad_()
    for which, want in ((0, want_x), (1, want_lad)):
        out = fastflow.mixture_cdf_inverse(yr, *params, kind=kind, output=output)[which]
        d1 = torch.autograd.grad(out.sum(), yr, create_graph=True)[0]
        d2 = torch.autograd.grad(d1.sum(), yr)[0]
        torch.testing.assert_close(d2, want.detach(), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("kind,output", CASES, ids=CASE_IDS)
def test_gradgradcheck_fp64(backend, kind, output):
    """Double backward of all three ops against finite differences of their backward (on the
    interpreted kernels a random-projection check: they are slow)."""
    fast = backend == "triton"
    for name in OPS:
        if name == "mixture_log_prob" and output == "logit":
            continue  # the density has no output choice
        fn = _op(name, kind, output)
        a, params = _problem(name, kind, output, shape=(3,))
        leaves = [t.clone().requires_grad_() for t in (a, *params)]
        assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=fast), name


def test_gradgradcheck_registered_ops(backend):
    """The forward ops' own registered derivatives (torch.ops.fastflow) differentiate twice."""
    ops = torch.ops.fastflow
    for kind, output in CASES[:2] if backend == "triton" else CASES:
        x, params = _problem("mixture_cdf", kind, output, shape=(3,))
        full = [p.expand(3, 2).clone().requires_grad_() for p in params]
        y = ops.mixture_cdf_fwd(x, *full, kind, output)[0].detach()
        fast = backend == "triton"
        for op, a, extra in ((ops.mixture_cdf_fwd, x, (kind, output)),
                             (ops.mixture_cdf_inverse_fwd, y, (kind, output)),
                             (ops.mixture_log_prob_fwd, x, (kind,))):
            leaves = [a.clone().requires_grad_(), *full]
            assert torch.autograd.gradgradcheck(lambda *t, op=op, extra=extra: op(*t, *extra),
                                                leaves, fast_mode=fast), op


def _spy_recorded_path(monkeypatch):
    """Count the backward calls that take the recorded (differentiable) path."""
    calls = []
    real = fastflow_ops.core.func_vjp

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for module in (fastflow_ops.mixture_cdf, fastflow_ops.mixture_inverse, fastflow_ops.made):
        monkeypatch.setattr(module, "func_vjp", spy)
    return calls


def test_first_derivatives_take_the_backward_ops(backend, monkeypatch):
    """grad, vmap(grad), grad(vmap) and jacrev need no derivative of the backward: they run
    the first-order backward ops (on the whole batch under vmap); a second derivative
    (nested transforms, create_graph=True with inputs that require grad) recomputes the
    gradients differentiably instead."""
    calls = _spy_recorded_path(monkeypatch)
    x, params = _problem("mixture_cdf", "gaussian", "logit")
    xr = x.clone().requires_grad_()

    def loss(x, logits):
        y, lad = fastflow.mixture_cdf(x, logits, *params[1:], kind="gaussian", output="logit")
        return (y + lad).sum()

    first = {
        "grad": lambda: grad(loss, argnums=(0, 1))(x, params[0]),
        "vmap(grad)": lambda: vmap(grad(loss), in_dims=(0, None))(x, params[0]),
        "grad(vmap)": lambda: grad(lambda x: vmap(loss, in_dims=(0, None))(x, params[0]).sum())(x),
        "jacrev": lambda: jacrev(lambda x: fastflow.mixture_cdf(x, *params)[0])(x),
        "backward": lambda: torch.autograd.grad(loss(xr, params[0]), xr),
    }
    for what, run in first.items():
        calls.clear()
        run()
        assert not calls, what
    second = {
        "jacrev(jacrev)": lambda: jacrev(jacrev(loss))(x, params[0]),
        "grad(grad)": lambda: grad(lambda x: grad(loss)(x, params[0]).sum())(x),
        "create_graph": lambda: torch.autograd.grad(loss(xr, params[0]), xr, create_graph=True),
    }
    for what, run in second.items():
        calls.clear()
        run()
        assert calls, what


def test_second_derivative_at_the_same_torch_func_level_raises():
    """torch.autograd.grad(..., create_graph=True) inside a function that torch.func.grad
    transforms would differentiate a first-order backward op at the level that ran it: a
    clear error, not a silently constant gradient."""
    x, params = _problem("mixture_cdf", "logistic", "unit")

    def f(x):
        y = fastflow.mixture_cdf(x, *params)[0].sum()
        return torch.autograd.grad(y, x, create_graph=True)[0].sum()

    with pytest.raises(RuntimeError, match="has no derivative"):
        grad(f)(x)


@pytest.mark.parametrize("dtype,x,log_scale", [
    (torch.float32, -5.011872336272722, [0.0, -10.0]),
    (torch.float64, -1.5e5, [9.210340371976184, -10.0])], ids=["fp32", "fp64"])
def test_recorded_gradients_equal_plain_ones_deep_in_a_gaussian_tail(backend, dtype, x,
                                                                     log_scale):
    """A narrow Gaussian component far from x (u ~ -5e4 in float32, -3e9 in float64) beside a
    wide one: gradients taken with create_graph=True (through the oracle's log-space formulas)
    equal the backward kernels' and are finite, and so is the Hessian. Before, torch's
    log_ndtr derivative overflowed there and they came out NaN."""
    for output in ("unit", "logit"):
        args = [torch.tensor(v, dtype=dtype).requires_grad_()
                for v in (x, [0.0, 0.0], [0.0, 0.0], log_scale)]
        lad = fastflow.mixture_cdf(*args, kind="gaussian", output=output)[1]
        plain = torch.autograd.grad(lad.sum(), args)
        lad = fastflow.mixture_cdf(*args, kind="gaussian", output=output)[1]
        recorded = torch.autograd.grad(lad.sum(), args, create_graph=True)
        for p, r in zip(plain, recorded, strict=True):
            torch.testing.assert_close(r.detach(), p, rtol=1e-5, atol=1e-7)
        params = [a.detach() for a in args[1:]]
        hess = hessian(lambda v, o=output, p=params: fastflow.mixture_cdf(
            v, *p, kind="gaussian", output=o)[1].sum())(args[0].detach())
        assert torch.isfinite(hess).all()


def test_boundary_targets_keep_zero_higher_derivatives(backend):
    """Targets z = 0 and 1 (x = -inf, +inf) add no gradient at any order: the second
    derivatives of a loss on the finite solutions are those without the boundary targets,
    and finite."""
    params = random_mixture((1,), 2, dtype=F64)  # (1, K): shared by every target
    y = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=F64)
    y_all = torch.cat([y, torch.tensor([0.0, 1.0], dtype=F64)])

    def loss(y, logits, loc, log_scale):
        x, lad = fastflow.mixture_cdf_inverse(y, logits, loc, log_scale, kind="gaussian")
        finite = torch.isfinite(x)
        return (torch.where(finite, x, 0.0) ** 2 + torch.where(finite, lad, 0.0)).sum()

    with_boundary = hessian(loss, argnums=(1, 2, 3))(y_all, *params)
    without = hessian(loss, argnums=(1, 2, 3))(y, *params)
    for row_a, row_b in zip(with_boundary, without, strict=True):
        for a, b in zip(row_a, row_b, strict=True):
            assert torch.isfinite(a).all()
            _close(a, b)
    leaves = [t.clone().requires_grad_() for t in (y_all, *params)]
    g = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
    assert (g[0][-2:] == 0).all()
    gg = torch.autograd.grad(sum(t.sum() for t in g), leaves[1:])
    assert all(torch.isfinite(t).all() for t in gg)


def test_half_precision_second_derivatives_are_computed_in_float32():
    """float16 inputs: second derivatives through the float32 log-space forward, returned in
    float16, close to the float64 ones."""
    x, params = _problem("mixture_cdf", "logistic", "logit", shape=(4,))

    def second(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, *params)]
        y, lad = fastflow.mixture_cdf(leaves[0], *leaves[1:], output="logit")
        g = torch.autograd.grad((y + lad).sum(), leaves[0], create_graph=True)[0]
        return torch.autograd.grad(g.sum(), leaves)

    half, full = second(torch.float16), second(F64)
    for h, f in zip(half, full, strict=True):
        assert h.dtype == torch.float16
        torch.testing.assert_close(h.double(), f, rtol=2e-2, atol=2e-2)


def test_validation_is_skipped_under_transforms_only():
    x, params = _problem("mixture_cdf", "logistic", "unit")
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        fastflow.mixture_cdf(bad, *params)
    y = vmap(lambda r: fastflow.mixture_cdf(r, *params)[0])(bad)
    assert torch.isnan(y[1, 2]) and torch.isfinite(y[0]).all()


def _flow():
    torch.manual_seed(0)
    flow = Flow([AutoregressiveMixtureFlow(2, 3, [8], seed=0), Reverse(2), MixtureCDFFlow(2, 3)],
                StandardNormal(2))
    return flow.to(F64)


class _LogProb(torch.nn.Module):
    """flow.log_prob as a module's forward, for torch.func.functional_call."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return self.flow.log_prob(x)


def test_flow_log_prob_under_torch_func(backend):
    """A flow's log-density: per-sample input gradients (vmap of grad), parameter Jacobians
    (jacrev over functional_call), per-sample input Hessians (vmap of hessian and of
    jacrev(jacrev)) and per-sample parameter gradients equal plain autograd's, per sample."""
    model = _LogProb(_flow())
    x = torch.randn(4, 2, dtype=F64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_prob_row(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    grads_x = vmap(grad(log_prob_row, argnums=1), in_dims=(None, 0))(params, x)
    xr = x.clone().requires_grad_()
    _close(grads_x, torch.autograd.grad(model(xr).sum(), xr)[0])

    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    per_sample = vmap(grad(log_prob_row), in_dims=(None, 0))(params, x)
    named = dict(model.named_parameters())
    for i in range(x.shape[0]):
        want = torch.autograd.grad(model(x[i:i + 1]).sum(), list(named.values()))
        for (k, w) in zip(named, want, strict=True):
            _close(jac[k][i], w)
            _close(per_sample[k][i], w)

    want = torch.stack([torch.autograd.functional.hessian(
        lambda xi: model(xi.unsqueeze(0)).squeeze(0), x[i]) for i in range(x.shape[0])])
    row = lambda xi: log_prob_row(params, xi)  # noqa: E731
    _close(vmap(hessian(row))(x), want)
    _close(vmap(jacrev(jacrev(row)))(x), want)
    _close(vmap(jacfwd(jacrev(row)))(x), want)


def test_flow_ensemble_under_vmap(backend):
    """vmap over stacked parameters of two flows (an ensemble) gives each flow's log-density:
    the batching rules' per-model path, and parameters batched in the mixture ops."""
    flows = [_LogProb(_flow()) for _ in range(2)]
    with torch.no_grad():
        for p in flows[1].parameters():
            p.add_(0.1 * torch.randn_like(p))
    params, buffers = torch.func.stack_module_state(flows)
    x = torch.randn(3, 2, dtype=F64)
    got = vmap(lambda p, b: functional_call(flows[0], (p, b), (x,)))(params, buffers)
    with torch.no_grad():
        want = torch.stack([f(x) for f in flows])
    _close(got, want)


@pytest.mark.parametrize("direction", ["maf", "iaf"])
def test_one_pass_route_under_vmap_with_a_shared_context(backend, direction):
    """vmap over batches of values with one (unbatched) context, without gradients (the
    one-pass route): the context's per-row biases repeat for each batch entry, as a loop
    over the batch gives. Before, the rule folded the values' batch into their rows but not
    the biases', and the CPU path raised a shape error."""
    torch.manual_seed(0)
    layer = AutoregressiveMixtureFlow(3, 3, [8], context_features=2, direction=direction,
                                      output="logit", seed=0)
    context, values = torch.randn(5, 2), torch.randn(4, 5, 3)
    # The sequential direction: MAF's inverse (sampling), IAF's forward (density).
    step = layer.inverse if direction == "maf" else layer.forward
    with torch.no_grad():
        got = vmap(lambda v: step(v, context))(values)
        want = [step(v, context) for v in values]
    for g, w in zip(got, zip(*want, strict=True), strict=True):
        torch.testing.assert_close(g, torch.stack(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["maf", "iaf"])
def test_forward_mode_of_a_frozen_flow_matches_reverse_mode(backend, direction):
    """jacfwd of a frozen flow (parameters without requires_grad, as in a fixed prior)
    through its sequential direction and its log-density equals jacrev's. Before, forward
    mode took the one-pass solve, which has no derivative, and raised."""
    torch.manual_seed(0)
    layer = AutoregressiveMixtureFlow(2, 2, [8], direction=direction, output="logit",
                                      seed=0).double().requires_grad_(False)
    flow = Flow([layer], StandardNormal(2)).double()
    z = torch.randn(3, 2, dtype=F64)
    step = layer.inverse if direction == "maf" else layer.forward
    for fn in (lambda v: step(v)[0], lambda v: step(v)[1], flow.log_prob):
        _close(jacfwd(fn)(z), jacrev(fn)(z))


def test_dual_tensors_of_forward_ad_are_a_clear_error(backend):
    """torch.autograd.forward_ad's dual tensors are refused with a message naming the
    supported route (torch.func.jvp), which gives the same tangent as autograd's Jacobian."""
    import torch.autograd.forward_ad as fwAD

    x, params = _problem("mixture_cdf", "logistic", "logit")
    flow = Flow([MixtureCDFFlow(3, 2, output="logit")], StandardNormal(3)).double()
    tangent = torch.ones_like(x)
    for fn in (lambda a: fastflow.mixture_cdf(a, *params, output="logit")[0], flow.log_prob):
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="torch.func.jvp"):
            fn(fwAD.make_dual(x, tangent))
        want = torch.autograd.functional.jvp(fn, x, tangent)[1]
        _close(torch.func.jvp(fn, (x,), (tangent,))[1], want)


def test_public_functions_apply_under_transforms(backend):
    """fastflow.MixtureCDF & co. applied directly (not through the functional API) under
    vmap and grad, and in plain eager mode."""
    x, params = _problem("mixture_cdf", "logistic", "logit")
    fns = (lambda a: fastflow.MixtureCDF.apply(a, *params, "logistic", "logit"),
           lambda a: fastflow.MixtureLogProb.apply(a, *params, "logistic"),
           lambda a: fastflow.MixtureCDFInverse.apply(torch.sigmoid(a), *params, "logistic",
                                                      "unit"))
    for fn in fns:
        def loss(a, fn=fn):
            out = fn(a)
            return sum(t.sum() for t in (out if isinstance(out, tuple) else (out,)))

        xr = x.clone().requires_grad_()
        want = torch.autograd.grad(loss(xr), xr)[0]
        _close(vmap(grad(loss))(x), want)
        _close(grad(loss)(x), want)


def test_a_distribution_used_after_functional_call_is_refused():
    """A flow's call returns a distribution; made inside functional_call (here over an
    ensemble's stacked parameters under vmap) and used after the call, it would score with
    the module's own parameters: a ValueError says so. Computing log_prob inside the call,
    through a module whose forward does it, gives each member's density."""
    torch.manual_seed(0)
    members = [fastflow.flows.MAF(2, context=3, transforms=1, components=3,
                                  hidden_features=(8,), seed=i) for i in range(2)]
    params, buffers = torch.func.stack_module_state(members)
    context, x = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match="made while the flow had other parameters"):
        vmap(lambda p, b: functional_call(members[0], (p, b), (context,)).log_prob(x))(
            params, buffers)

    class LogProb(torch.nn.Module):
        def __init__(self, flow):
            super().__init__()
            self.flow = flow

        def forward(self, x, context):
            return self.flow(context).log_prob(x)

    prefixed = [{f"flow.{k}": v for k, v in d.items()} for d in (params, buffers)]
    got = vmap(lambda p, b: functional_call(LogProb(members[0]), (p, b), (x, context)))(
        *prefixed)
    with torch.no_grad():
        want = torch.stack([m(context).log_prob(x) for m in members])
    torch.testing.assert_close(got, want)
