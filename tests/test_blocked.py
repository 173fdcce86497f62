"""MADE's "blocks" route: prefix masks as a few dense products (fastflow/ops/blocked.py),
against the dense masked product and autograd, and how MADE picks and refreshes its blocks."""

import pytest
import torch

import fastflow
from fastflow.nn import MADE, AutoregressiveMixtureFlow
from fastflow.nn import made as made_nn
from fastflow.ops import blocked, dispatch


def _prefix_mask(limits, k):
    return (torch.arange(k)[None, :] < torch.as_tensor(limits)[:, None]).double()


def _free_blocks(monkeypatch, counts=None):
    """Blocks cost nothing but their multiply-adds: the plan takes the most blocks offered."""
    monkeypatch.setitem(blocked.PLAN, "overhead", 0.0)
    monkeypatch.setitem(blocked.PLAN, "min_columns", 0)
    if counts is not None:
        monkeypatch.setitem(blocked.PLAN, "counts", counts)


def _dense(x, weight, mask, bias, relu):
    y = torch.nn.functional.linear(x, weight * mask, bias)
    return torch.relu(y) if relu else y


LIMIT_CASES = {
    # rows x columns, with the first rows seeing nothing (a MADE head's first dimension)
    "ramp-with-empty-rows": ([0] * 5 + list(range(1, 38)) + [37] * 3, 40),
    "steps": ([3] * 9 + [17] * 20 + [33] * 11, 33),
    "full": ([24] * 30, 24),
    "one-row": ([5], 7),
}


@pytest.mark.parametrize("counts", [(1,), (2,), (4,), (16,)], ids=lambda c: f"G{c[0]}")
@pytest.mark.parametrize("case", list(LIMIT_CASES))
@pytest.mark.parametrize("relu", [False, True], ids=["identity", "relu"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
def test_prefix_linear_matches_the_dense_product_and_its_gradients(case, counts, relu, has_bias,
                                                                   monkeypatch):
    _free_blocks(monkeypatch, counts)
    limits, k = LIMIT_CASES[case]
    mask = _prefix_mask(limits, k)
    n = mask.shape[0]
    x = torch.randn(11, k, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True) if has_bias else None
    # None: the plan is the dense product itself
    blocks = blocked.plan_blocks(blocked.prefix_limits(mask), k) or ((0, n, k),)
    assert (len(blocks) > 1) == (counts[0] > 1 and n >= 2 * blocked.ALIGN)
    y = blocked.PrefixLinear.apply(x, weight, mask, bias, blocks, relu)
    y_ref = _dense(x, weight, mask, bias, relu)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    leaves = [t for t in (x, weight, bias) if t is not None]
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(y_ref, leaves, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert (got[1][mask == 0] == 0).all()  # no gradient leaks onto masked weights


def _prefix_linear_case(limits, n_blocks, relu):
    """PrefixLinear over a 7-column prefix mask with these row limits, cut into ``n_blocks``
    blocks, as a function of (x, weight, bias), and float64 arguments for it."""
    mask = _prefix_mask(limits, 7)
    blocks = blocked.plan_blocks(blocked.prefix_limits(mask), 7)
    assert len(blocks) == n_blocks
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
            for s in ((4, 7), (len(limits), 7), (len(limits),))]
    return (lambda x, w, b: blocked.PrefixLinear.apply(x, w, mask, b, blocks, relu)), args


@pytest.mark.parametrize("relu", [False, True], ids=["identity", "relu"])
def test_prefix_linear_gradients_match_finite_differences(relu, monkeypatch):
    _free_blocks(monkeypatch, (4,))
    fn, args = _prefix_linear_case(
        [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7], 3, relu)
    torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("relu", [False, True], ids=["identity", "relu"])
def test_prefix_linear_second_derivatives(relu, monkeypatch):
    """create_graph=True through the blocks: the recorded backward has its own gradients."""
    _free_blocks(monkeypatch, (4,))
    fn, args = _prefix_linear_case([0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 7, 7, 7], 2, relu)
    torch.autograd.gradgradcheck(fn, args)


def test_flow_on_the_blocks_route_under_torch_func(monkeypatch):
    """The default CPU route (blocks) under vmap(grad), jacrev, jacfwd and create_graph=True
    gives what the dense route gives: the transforms and forward-mode AD take the dense
    product, a recorded backward the differentiable one."""
    _free_blocks(monkeypatch)
    monkeypatch.setenv("FASTFLOW_BACKEND", "auto")
    torch.manual_seed(0)
    flow = fastflow.flows.MAF(5, transforms=2, components=3, hidden_features=(24, 24)).double()
    made = flow.transforms[0].made
    assert all(layer.blocks() is not None for layer in [made.layers[1], made.output])
    x = torch.randn(3, 5, dtype=torch.float64)

    def row(xi):
        return flow.log_prob(xi.unsqueeze(0)).squeeze(0)

    xr = x.clone().requires_grad_()
    g, = torch.autograd.grad(flow.log_prob(xr).sum(), xr, create_graph=True)
    hess = torch.stack([torch.autograd.grad(g[:, j].sum(), xr, retain_graph=True)[0]
                        for j in range(5)], 1)
    monkeypatch.setitem(dispatch.CPU_ROUTE, "linear", "dense")
    monkeypatch.setitem(dispatch.CPU_ROUTE, "head", "dense")
    xd = x.clone().requires_grad_()
    want = torch.autograd.grad(flow.log_prob(xd).sum(), xd)[0]
    want_hess = torch.stack([torch.autograd.functional.hessian(row, xi) for xi in x])
    monkeypatch.undo()
    _free_blocks(monkeypatch)
    torch.testing.assert_close(g, want)
    torch.testing.assert_close(hess, want_hess)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(row))(x), want)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(torch.func.jacrev(row)))(x),
                               want_hess)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(row)))(x),
                               want_hess)


def test_blocks_route_under_batched_gradients(monkeypatch):
    """is_grads_batched=True and jacobian(vectorize=True) run the backward on batched
    gradients, for which products into out= views have no batching rule: the blocks route
    gives the dense route's Jacobian."""
    _free_blocks(monkeypatch)
    monkeypatch.setenv("FASTFLOW_BACKEND", "auto")
    made = MADE(9, [24, 24], out_multiplier=3).double()
    assert made.output.blocks() is not None
    x = torch.randn(2, 9, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(made, x, vectorize=True)
    xr = x.clone().requires_grad_()
    out = made(xr)
    eye = torch.eye(out.numel(), dtype=torch.float64).reshape(-1, *out.shape)
    rows = torch.autograd.grad(out, xr, eye, is_grads_batched=True)[0]
    monkeypatch.setitem(dispatch.CPU_ROUTE, "linear", "dense")
    monkeypatch.setitem(dispatch.CPU_ROUTE, "head", "dense")
    want = torch.autograd.functional.jacobian(made, x)
    torch.testing.assert_close(jac, want)
    torch.testing.assert_close(rows.reshape(want.shape), want)


def test_prefix_limits_accepts_only_sorted_prefix_masks():
    mask = _prefix_mask([0, 2, 2, 5], 6)
    assert blocked.prefix_limits(mask).tolist() == [0, 2, 2, 5]
    assert blocked.prefix_limits(mask.flip(0)) is None        # limits decrease
    assert blocked.prefix_limits(mask.flip(1)) is None        # suffix, not prefix
    holed = mask.clone()
    holed[3, 1] = 0
    assert blocked.prefix_limits(holed) is None


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (40, 40), (1000, 300), (23520, 1024)])
def test_plan_blocks_cover_every_row_with_enough_columns(n, k):
    limits = torch.linspace(0, k, n).floor().long().clamp(max=k)
    blocks = blocked.plan_blocks(limits, k)
    if blocks is None:  # the dense product: worth no extra products at this size
        assert n * k < 1000 * 300
        return
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    for (r0, r1, L), nxt in zip(blocks, blocks[1:] + ((n, n, k),), strict=True):
        assert r0 < r1 == nxt[0]
        assert int(limits[r0:r1].max()) <= L <= k
    work = sum((r1 - r0) * L for r0, r1, L in blocks)
    assert work <= n * k
    if n * k >= 1000 * 300:  # a large ramp is cut: about half the dense product's work
        assert work < 0.7 * n * k


def _made_cases():
    return {
        "natural": dict(order="natural"),
        "random-degrees": dict(hidden_degrees="random", seed=4),
        "random-order": dict(order="random", seed=3),      # first layer and head: dense
        "residual": dict(residual=True),
        "context": dict(context_features=2),
    }


@pytest.mark.parametrize("case", list(_made_cases()))
def test_made_blocks_route_matches_the_dense_route(case, monkeypatch):
    _free_blocks(monkeypatch)
    made = MADE(9, [24, 24], out_multiplier=6, **_made_cases()[case]).double()
    x = torch.randn(13, 9, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(13, 2, dtype=torch.float64) if case == "context" else None

    def run(how):
        monkeypatch.setitem(dispatch.CPU_ROUTE, "linear", how)
        monkeypatch.setitem(dispatch.CPU_ROUTE, "head", how)
        out = made(x, ctx)
        g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        return out, torch.autograd.grad(out, [x, *made.parameters()], g)

    out_b, grads_b = run("blocks")
    out_d, grads_d = run("dense")
    torch.testing.assert_close(out_b, out_d)
    for a, b in zip(grads_b, grads_d, strict=True):
        torch.testing.assert_close(a, b)
    layers = [*made.layers, made.output]
    blocked_layers = [layer.blocks() is not None for layer in layers]
    if case == "random-order":
        assert blocked_layers == [False, True, False]
    else:
        assert all(blocked_layers)


def test_made_replans_when_its_masks_change(monkeypatch):
    """Blocks come from the mask in the module now: loading another model's masks (other
    hidden degrees) must not reuse the blocks planned for the old ones."""
    _free_blocks(monkeypatch)
    a = MADE(8, [32], out_multiplier=3, hidden_degrees="random", seed=1)
    b = MADE(8, [32], out_multiplier=3, hidden_degrees="random", seed=2)
    x = torch.randn(5, 8)
    with torch.no_grad():
        b(x)
        before = [layer.blocks() for layer in (*b.layers, b.output)]
        b.load_state_dict(a.state_dict())
        assert [layer.blocks() for layer in (*b.layers, b.output)] != before
        torch.testing.assert_close(b(x), a(x))
        planned = b.output.blocks()
        monkeypatch.setitem(blocked.PLAN, "counts", (2,))
        assert b.output.blocks() != planned and len(b.output.blocks()) == 2


def test_route_reads_the_inference_entries_when_autograd_records_nothing(monkeypatch):
    """Training (autograd records the product) and inference read separate route entries:
    the blocks route's backward can cost more than its forward saves."""
    monkeypatch.setitem(dispatch.CPU_ROUTE, "head", "dense")
    monkeypatch.setitem(dispatch.CPU_ROUTE, "head_inference", "blocks")
    layer = MADE(6, [16], 9, seed=0).output
    x = torch.randn(5, 16)
    assert dispatch.route(x, "head") == "dense"
    with torch.no_grad():
        assert dispatch.route(x, "head") == "blocks"
    seen = []
    monkeypatch.setattr(dispatch, "route", lambda x, part, grad: seen.append(grad) or "dense")
    layer(x)  # parameters require grad: recorded
    with torch.no_grad():
        layer(x)
    layer.requires_grad_(False)
    layer(x)  # nothing requires grad: not recorded
    assert seen == [True, False, False]


def test_reference_backend_and_compile_take_the_dense_route(monkeypatch):
    """FASTFLOW_BACKEND=reference is the plain model (the oracle, the benchmarks' eager
    baseline); torch.compile traces the dense route without a graph break."""
    x = torch.randn(4, 3)
    assert dispatch.route(x, "linear") == dispatch.CPU_ROUTE["linear"]
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    assert dispatch.route(x, "linear") == dispatch.route(x, "head") == "dense"
    monkeypatch.delenv("FASTFLOW_BACKEND")
    flow = AutoregressiveMixtureFlow(6, 3, [16, 16], output="logit", seed=0)
    x = torch.randn(10, 6)
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: flow(v)[1], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), flow(x)[1])


def test_masked_linear_role_and_input_are_checked():
    mask = _prefix_mask([1, 2], 3)
    with pytest.raises(ValueError, match="role must be one of"):
        made_nn.MaskedLinear(3, 2, mask, role="output")
    layer = made_nn.MaskedLinear(3, 2, mask)
    with pytest.raises(ValueError, match="x must end in K = 3 features"):
        layer(torch.randn(4, 5))
    with pytest.raises(ValueError, match="activation must be"):
        layer(torch.randn(4, 3), activation="tanh")
