"""Public API: bad input, value validation, the registered ops (opcheck) and torch.compile."""

import pytest
import torch

import fastflow

from conftest import DEVICE
from helpers import random_mixture, sample_x

FUNCS = {
    "mixture_cdf": fastflow.mixture_cdf,
    "mixture_cdf_inverse": fastflow.mixture_cdf_inverse,
    "mixture_log_prob": fastflow.mixture_log_prob,
}
FIRST_ARG = {"mixture_cdf": "x", "mixture_cdf_inverse": "y", "mixture_log_prob": "x"}


def _good(shape=(4, 5), K=3):
    params = random_mixture(shape, K)
    return torch.rand(shape), params


@pytest.fixture(params=list(FUNCS))
def func(request):
    return request.param


def _raises(func, match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        FUNCS[func](*args, **kwargs)


def test_parameter_shape_that_does_not_broadcast_names_it(func):
    x, (logits, loc, log_scale) = _good()
    _raises(func, "loc", x, logits, torch.zeros(7, 3), log_scale)
    _raises(func, "log_scale", x, logits, loc, torch.zeros(2, 4, 5, 3))


def test_broadcast_rule_agrees_with_torch():
    """The plain-Python broadcast check against torch.broadcast_shapes on random shapes."""
    from fastflow.checks import _broadcasts_to

    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        full = tuple(torch.randint(1, 4, (int(torch.randint(0, 4, (), generator=gen)),),
                                   generator=gen).tolist())
        shape = tuple(torch.randint(1, 4, (int(torch.randint(0, 5, (), generator=gen)),),
                                    generator=gen).tolist())
        try:
            want = torch.broadcast_shapes(shape, full) == torch.Size(full)
        except RuntimeError:
            want = False
        assert _broadcasts_to(shape, full) == want, (shape, full)


def test_parameters_with_different_K_name_the_argument(func):
    x, (logits, loc, log_scale) = _good()
    _raises(func, "log_scale has 2 components", x, logits, loc, log_scale[..., :2])
    _raises(func, "loc has 4 components", x, logits, torch.zeros(4, 5, 4), log_scale)


def test_scalar_parameter_and_zero_components_are_rejected(func):
    x, (logits, loc, log_scale) = _good()
    _raises(func, "logits must have a trailing", x, torch.tensor(0.0), loc, log_scale)
    _raises(func, "K >= 1", x, logits[..., :0], loc[..., :0], log_scale[..., :0])


def test_integer_dtypes_and_non_tensors_are_rejected(func):
    x, (logits, loc, log_scale) = _good()
    name = FIRST_ARG[func]
    _raises(func, f"{name} must be a floating-point", x.to(torch.int64), logits, loc, log_scale)
    _raises(func, "logits must be a floating-point", x, logits.to(torch.int32), loc, log_scale)
    _raises(func, "loc must be a torch.Tensor", x, logits, [0.0, 1.0, 2.0], log_scale)


def test_tensors_on_different_devices_are_rejected(func):
    x, (logits, loc, log_scale) = _good()
    _raises(func, "log_scale is on meta", x, logits, loc, log_scale.to("meta"))


def test_unknown_kind_and_output_are_rejected(func):
    x, params = _good()
    _raises(func, "kind must be one of", x, *params, kind="cauchy")
    if func != "mixture_log_prob":
        _raises(func, "output must be one of", x, *params, output="probit")


@pytest.mark.parametrize("bad", ["x", "logits", "loc", "log_scale"])
def test_public_autograd_functions_reject_integer_tensors(bad):
    """The Functions skip the functional API's checks; an integer tensor would reach a backend
    that truncates (a long x gave integer y and logabsdet): a ValueError naming it."""
    from fastflow.ops import MixtureCDF, MixtureCDFInverse, MixtureLogProb

    x, params = _good()
    args = dict(zip(["x", "logits", "loc", "log_scale"], [torch.sigmoid(x), *params],
                    strict=True))
    args[bad] = torch.ones_like(args[bad], dtype=torch.long)
    values = list(args.values())
    name = "y" if bad == "x" else bad
    with pytest.raises(ValueError, match=f"{name} must be a floating-point tensor"):
        MixtureCDFInverse.apply(*values, "logistic", "unit")
    with pytest.raises(ValueError, match=f"{bad} must be a floating-point tensor"):
        MixtureCDF.apply(*values, "logistic", "unit")
    with pytest.raises(ValueError, match=f"{bad} must be a floating-point tensor"):
        MixtureLogProb.apply(*values, "logistic")


@pytest.mark.parametrize("kind,output,match", [
    ("logisitc", "unit", "kind must be one of"), ("logistic", "Unit", "output must be one of"),
    ("gaussian", "density", "output must be one of")])
def test_public_autograd_functions_reject_unknown_kind_and_output(kind, output, match):
    """The Functions and the ops they call branch on kind and output: a misspelled string
    must raise, not fall through to the other formula ("density" is no output of the
    mixture CDF's ops: its y would be None)."""
    from fastflow.ops import MixtureCDF, MixtureCDFInverse, MixtureLogProb

    x, params = _good()
    for fn in (MixtureCDF, MixtureCDFInverse):
        with pytest.raises(ValueError, match=match):
            fn.apply(torch.sigmoid(x), *params, kind, output)
    if match.startswith("kind"):
        with pytest.raises(ValueError, match=match):
            MixtureLogProb.apply(x, *params, kind)
    # The registered ops themselves, as torch.ops.fastflow exposes them.
    full = [p.expand(*x.shape, 3) for p in params]
    with pytest.raises(ValueError, match=match):
        torch.ops.fastflow.mixture_cdf_fwd(x, *full, kind, output)
    with pytest.raises(ValueError, match=match):
        torch.ops.fastflow.mixture_cdf_inverse_fwd(torch.sigmoid(x), *full, kind, output)


def test_validation_raises_on_nan_and_out_of_domain_values():
    x, (logits, loc, log_scale) = _good()
    bad_x = x.clone()
    bad_x[1, 2] = float("nan")
    _raises("mixture_cdf", "x contains NaN", bad_x, logits, loc, log_scale)
    _raises("mixture_log_prob", "x contains NaN", bad_x, logits, loc, log_scale)
    _raises("mixture_cdf_inverse", "y must lie in", x + 1.0, logits, loc, log_scale)
    _raises("mixture_cdf_inverse", "y contains NaN", bad_x, logits, loc, log_scale,
            output="logit")
    inf_x = x.clone()
    inf_x[0, 1] = float("inf")
    # logit F has no logabsdet at x = +-inf (the unit output's is log f = -inf there).
    _raises("mixture_cdf", "x must be finite for output='logit'", inf_x, logits, loc, log_scale,
            output="logit")
    y, lad = fastflow.mixture_cdf(inf_x, logits, loc, log_scale, output="unit")
    assert y[0, 1] == 1.0 and lad[0, 1] == -float("inf")
    bad_loc = loc.clone()
    bad_loc[0, 0, 0] = float("inf")
    _raises("mixture_cdf", "loc must be finite", x, logits, bad_loc, log_scale)


def test_validation_off_per_call_and_globally_gives_nan_without_raising():
    x, params = _good()
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    y, lad = fastflow.mixture_cdf(bad_x, *params, validate_args=False)
    assert torch.isnan(y[0, 0]) and torch.isnan(lad[0, 0])
    assert torch.isfinite(y[1:]).all()
    assert fastflow.get_validate_args() is True
    fastflow.set_validate_args(False)
    try:
        x_inv, _ = fastflow.mixture_cdf_inverse(x + 2.0, *params)
        assert torch.isnan(x_inv).all()
        with pytest.raises(ValueError, match="y must lie in"):
            fastflow.mixture_cdf_inverse(x + 2.0, *params, validate_args=True)
    finally:
        fastflow.set_validate_args(True)
    with pytest.raises(ValueError, match="validate_args must be a bool"):
        fastflow.set_validate_args("yes")
    with pytest.raises(ValueError, match="validate_args must be a bool or None, got 'yes'"):
        fastflow.mixture_cdf(x, *params, validate_args="yes")


def test_scalar_input_and_mixed_dtypes_promote():
    logits, loc, log_scale = random_mixture((), 4, dtype=torch.float64)
    y, lad = fastflow.mixture_cdf(torch.tensor(0.3), logits, loc, log_scale)
    assert y.shape == () and y.dtype == torch.float64


def test_empty_input_gives_empty_output(backend):
    params = random_mixture((0, 5), 3, device=DEVICE)
    x = torch.empty(0, 5, device=DEVICE)
    y, lad = fastflow.mixture_cdf(x, *params)
    assert y.shape == (0, 5) and lad.shape == (0, 5)


# --------------------------------------------------------------------------------------------
# Registered ops
# --------------------------------------------------------------------------------------------
def _op_args(kind, output, requires_grad):
    shape, K = (3, 5), 3
    params = random_mixture(shape, K, dtype=torch.float64, device=DEVICE, shared=True)
    full = (*shape, K)
    x = sample_x(*params, shape, 3.0)
    expanded = [p.expand(full).requires_grad_(requires_grad) for p in params]
    return x.requires_grad_(requires_grad), expanded


OP_CASES = [(kind, output) for kind in ("logistic", "gaussian") for output in ("unit", "logit")]


@pytest.mark.parametrize("kind,output", OP_CASES, ids=[f"{k}-{o}" for k, o in OP_CASES])
def test_opcheck_every_op(backend, kind, output):
    ops = torch.ops.fastflow
    x, params = _op_args(kind, output, requires_grad=True)
    y, _ = fastflow.mixture_cdf(x.detach(), *params, kind=kind, output=output)
    cot = torch.randn_like(x)
    checks = [
        (ops.mixture_cdf_fwd, (x, *params, kind, output)),
        (ops.mixture_cdf_inverse_fwd, (y.detach().requires_grad_(), *params, kind, output)),
        (ops.mixture_log_prob_fwd, (x, *params, kind)),
        (ops.mixture_cdf_bwd, (cot, cot, x.detach(), *[p.detach() for p in params], kind,
                               output)),
        (ops.mixture_cdf_inverse_bwd, (cot, cot, x.detach(), *[p.detach() for p in params],
                                       kind, output)),
        (ops.mixture_log_prob_bwd, (cot, x.detach(), *[p.detach() for p in params], kind)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_forward_inverse_backward():
    """Forward, inverse and backprop through both compile with no graph break, and give the
    eager gradients."""
    shape, K = (4, 6), 3
    params = random_mixture(shape, K, shared=True)
    x0 = sample_x(*params, shape, 3.0)

    def loss_fn(x, logits, loc, log_scale):
        y, lad = fastflow.mixture_cdf(x, logits, loc, log_scale, output="logit")
        x2, lad2 = fastflow.mixture_cdf_inverse(y * 0.9, logits, loc, log_scale, output="logit")
        lp = fastflow.mixture_log_prob(x2, logits, loc, log_scale, kind="logistic")
        return (lad + lad2 + lp).sum() + x2.square().sum()

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x0, *params)]
        loss = fn(*leaves)
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss_c, grads_c = grads(compiled)
    loss_e, grads_e = grads(loss_fn)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge)
    explained = torch._dynamo.explain(loss_fn)(*[t.clone() for t in (x0, *params)])
    assert explained.graph_break_count == 0


def test_a_flow_used_eagerly_then_compiled_has_no_graph_break():
    """Sampling (the one-pass route) and a no-grad IAF density compile with fullgraph=True
    after the flow has run eagerly (its degree table cached: the cache is keyed by data
    pointers, which do not trace, and is bypassed under compile), with the eager results."""
    torch._dynamo.reset()
    maf = fastflow.flows.MAF(2, transforms=1, components=3, hidden_features=(8,), seed=0)
    iaf = fastflow.flows.IAF(2, transforms=1, components=3, hidden_features=(8,), seed=0)
    x = torch.randn(4, 2)
    with torch.no_grad():
        maf.sample((4,))
        want = iaf.log_prob(x)
        got = torch.compile(lambda v: iaf.log_prob(v), fullgraph=True, backend="aot_eager")(x)
        torch.manual_seed(1)
        eager = maf.sample((4,))
        torch.manual_seed(1)
        compiled = torch.compile(lambda: maf.sample((4,)), fullgraph=True,
                                 backend="aot_eager")()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("op", ["mixture_cdf", "mixture_cdf_inverse", "mixture_log_prob"])
def test_non_contiguous_inputs_match_contiguous(backend, op):
    """Transposed inputs and parameters give the same values and gradients as copies, and
    outputs come back contiguous (as the ops' fake implementations promise)."""
    K = 3
    base = [torch.rand(6, 5, device=DEVICE) * 0.8 + 0.1,
            *[torch.randn(6, 5, K, device=DEVICE) for _ in range(3)]]
    strided = [base[0].t(), *[p.transpose(0, 1) for p in base[1:]]]  # (5, 6) and (5, 6, K)
    contiguous = [t.contiguous() for t in strided]
    results = []
    for inputs in (strided, contiguous):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = FUNCS[op](*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        assert all(o.is_contiguous() for o in outs)
        grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves)
        results.append((outs, grads))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1], strict=True):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(torch.ops.fastflow.mixture_cdf_fwd,
                          (strided[0], *strided[1:], "gaussian", "logit"))


def test_backend_switch_errors_are_clear(monkeypatch):
    x, params = _good()
    monkeypatch.setenv("FASTFLOW_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTFLOW_BACKEND must be one of"):
        fastflow.mixture_cdf(x, *params)
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastflow.mixture_cdf(x, *params)


def test_subpackages_are_attributes_of_the_package():
    """After `import fastflow`, fastflow.data, .distributions, .flows and .nn are there, as
    fastflow.flows already was (fastflow.data.two_moons raised AttributeError)."""
    import subprocess
    import sys

    # A fresh interpreter: in this one other tests have imported the subpackages already.
    code = ("import fastflow as ff; ff.data.two_moons, ff.distributions.StandardNormal, "
            "ff.flows.MAF, ff.nn.Flow")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
