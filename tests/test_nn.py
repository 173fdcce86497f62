"""fastflow.nn and fastflow.distributions: autoregressive structure, log-determinants against
full autograd Jacobians, round trips, normalisation by quadrature, and bad input."""

import math

import pytest
import torch

import fastflow
from fastflow.distributions import MixtureOfGaussians, StandardNormal, Uniform
from fastflow.nn import (
    MADE,
    AutoregressiveMixtureFlow,
    Compose,
    Flow,
    Logit,
    MixtureCDFFlow,
    Permutation,
    Reverse,
    Sigmoid,
)

KINDS = ["logistic", "gaussian"]
DIRECTIONS = ["maf", "iaf"]

MADE_CASES = {
    "natural": dict(order="natural"),
    "random-order": dict(order="random", hidden_degrees="random", seed=3),
    "permutation": dict(order=torch.tensor([2, 0, 4, 1, 3])),
    "residual": dict(order="random", residual=True, seed=5),
    "context": dict(order="random", context_features=2, seed=7),
}


@pytest.mark.parametrize("case", list(MADE_CASES))
def test_made_outputs_depend_only_on_earlier_inputs(case):
    """Output d depends on input i only if deg(i) < deg(d); with sequential hidden degrees
    (every degree 1..D-1 present in each 12-unit layer) exactly then: hidden unit m sees the
    units of degree <= m below it, so every allowed connection has a path."""
    D, hidden = 5, [12, 12]
    made = MADE(D, hidden, out_multiplier=3, **MADE_CASES[case]).double()
    for p in made.parameters():  # no accidental zeros hiding a connection
        torch.nn.init.uniform_(p, 0.1, 1.0)
    # Positive inputs and parameters: every pre-activation is positive, so no ReLU cuts a
    # path and no two paths cancel.
    x = torch.rand(D, dtype=torch.float64) + 0.1
    ctx = torch.rand(2, dtype=torch.float64) + 0.1 if case == "context" else None
    J = torch.autograd.functional.jacobian(lambda v: made(v.unsqueeze(0), None if ctx is None
                                                          else ctx.unsqueeze(0))[0], x)
    deg = made.input_degrees
    allowed = deg[None, :] < deg[:, None]  # output dim d may see input i iff deg(i) < deg(d)
    dep = J.abs().sum(1) > 0               # (D outputs, D inputs)
    assert not (dep & ~allowed).any()
    assert dep[allowed].any()              # and the network is not trivially empty
    if MADE_CASES[case].get("hidden_degrees", "sequential") == "sequential":
        assert torch.equal(dep, allowed)
    if ctx is not None:
        Jc = torch.autograd.functional.jacobian(lambda c: made(x.unsqueeze(0),
                                                               c.unsqueeze(0))[0], ctx)
        assert (Jc.abs().sum((1, 2)) > 0).all()  # the context reaches every dimension


def _transforms(kind, direction):
    return {
        "ar-unit": AutoregressiveMixtureFlow(3, 4, [16, 16], kind=kind, direction=direction,
                                             output="unit", order="random", seed=1),
        "ar-logit-residual": AutoregressiveMixtureFlow(
            3, 3, [16, 16], kind=kind, direction=direction, output="logit", residual=True,
            seed=2),
        "ar-context": AutoregressiveMixtureFlow(3, 2, [8], kind=kind, direction=direction,
                                                output="logit", context_features=2, seed=4),
        "elementwise": MixtureCDFFlow(3, 5, kind=kind, output="logit"),
        "composition": Compose([MixtureCDFFlow(3, 2, kind=kind, output="logit"), Reverse(3),
                                AutoregressiveMixtureFlow(3, 2, [8], kind=kind,
                                                          direction=direction,
                                                          output="logit", seed=5)]),
    }


def _perturb(module, scale=0.3):
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["ar-unit", "ar-logit-residual", "ar-context", "elementwise",
                                  "composition"])
def test_logabsdet_equals_autograd_jacobian_and_round_trip(name, kind, direction):
    # Seeded: the networks' initial weights and x are drawn from the global generator, and
    # x round-trips only where the perturbed map is not flat in float64 at it.
    torch.manual_seed(0)
    t = _transforms(kind, direction)[name].double()
    _perturb(t)
    x = torch.randn(4, 3, dtype=torch.float64)
    ctx = torch.randn(4, 2, dtype=torch.float64) if name == "ar-context" else None
    z, lad = t(x, ctx)
    for b in range(x.shape[0]):
        c = None if ctx is None else ctx[b:b + 1]
        J = torch.autograd.functional.jacobian(lambda v, c=c: t(v.unsqueeze(0), c)[0][0], x[b])
        torch.testing.assert_close(lad[b], torch.linalg.slogdet(J)[1], rtol=1e-8, atol=1e-8)
    x_back, lad_inv = t.inverse(z, ctx)
    torch.testing.assert_close(x_back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(lad_inv, -lad, rtol=1e-8, atol=1e-8)


def test_logit_sigmoid_permutation_are_exact_inverses():
    x = torch.rand(6, 4, dtype=torch.float64) * 0.98 + 0.01
    for t in (Logit(4, alpha=0.01), Compose([Logit(4), Sigmoid(4, alpha=1e-6)]),
              Sigmoid(4), Permutation([2, 0, 3, 1])):
        z, lad = t(x)
        if isinstance(t, Compose):  # Sigmoid with Logit's alpha undoes it
            torch.testing.assert_close(z, x)
        J = torch.autograd.functional.jacobian(lambda v, t=t: t(v.unsqueeze(0))[0][0], x[0])
        torch.testing.assert_close(lad[0], torch.linalg.slogdet(J)[1])
        xb, ladi = t.inverse(z)
        torch.testing.assert_close(xb, x)
        torch.testing.assert_close(ladi, -lad)


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05])
def test_logit_keeps_float32_precision_next_to_both_ends(alpha):
    """Logit in float32 matches float64 to float32's precision at pixels next to 0 and next
    to 1 (1 - x formed exactly); before, log1p(-s) lost s's rounding near 1 (9e-4 relative
    at x = 1 - 2^-24 with alpha 1e-6)."""
    eps = 2.0 ** -24
    x32 = torch.tensor([[eps, 1e-5, 0.3, 1 - 1.5e-5, 1 - eps]])
    y32, lad32 = Logit(5, alpha=alpha)(x32)
    y64, lad64 = Logit(5, alpha=alpha)(x32.double())
    torch.testing.assert_close(y32.double(), y64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lad32.double(), lad64, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base", ["uniform", "normal", "mog"])
@pytest.mark.parametrize("kind", KINDS)
def test_1d_cdf_flow_integrates_to_one(kind, base):
    """The 1-D CDF flow of the lecture "Likelihood Models: Flow Models" (CS294-158) on each base:
    unit output onto a uniform base, logit output onto a Gaussian or a learnable Gaussian
    mixture."""
    bases = {"uniform": (Uniform(1), "unit"), "normal": (StandardNormal(1), "logit"),
             "mog": (MixtureOfGaussians(1, 3), "logit")}
    base_dist, output = bases[base]
    flow = Flow([MixtureCDFFlow(1, 4, kind=kind, output=output)], base_dist).double()
    _perturb(flow, scale=0.1 if base == "mog" else 0.3)
    grid = torch.linspace(-80, 80, 64001, dtype=torch.float64).unsqueeze(-1)
    p = flow.log_prob(grid).exp()
    assert abs(torch.trapezoid(p, grid[:, 0]).item() - 1.0) < 1e-5


@pytest.mark.parametrize("base", ["normal", "mog"])
@pytest.mark.parametrize("kind", KINDS)
def test_2d_autoregressive_flow_integrates_to_one(kind, base):
    """The 2-D autoregressive flow of the lecture "Likelihood Models: Flow Models" (CS294-158):
    z1 = f(x1), z2 = f(x2; x1)."""
    base_dist = StandardNormal(2) if base == "normal" else MixtureOfGaussians(2, 3)
    flow = Flow([AutoregressiveMixtureFlow(2, 3, [16], kind=kind, output="logit", seed=0)],
                base_dist).double()
    _perturb(flow, scale=0.1)  # larger scales can put visible mass far beyond the grid
    g = torch.linspace(-40, 40, 1201, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], -1)
    with torch.no_grad():
        p = flow.log_prob(pts).exp().reshape(1201, 1201)
    total = torch.trapezoid(torch.trapezoid(p, g, dim=1), g).item()
    assert abs(total - 1.0) < 2e-3


def test_flow_sampling_and_distribution_interface():
    flow = Flow([AutoregressiveMixtureFlow(3, 2, [8], output="logit", seed=0)],
                StandardNormal(3))
    dist = flow.distribution()
    assert isinstance(dist, torch.distributions.Distribution)
    s = dist.sample((4, 5))
    assert s.shape == (4, 5, 3) and torch.isfinite(s).all()
    torch.testing.assert_close(dist.log_prob(s), flow.log_prob(s))
    x = flow.rsample(7)
    loss = flow.log_prob(x.detach()).mean() + x.sum()
    loss.backward()
    assert all(p.grad is not None for p in flow.parameters())
    bpd = flow.bits_per_dim(s.reshape(-1, 3))
    torch.testing.assert_close(bpd, -flow.log_prob(s.reshape(-1, 3)).mean() / (3 * math.log(2)))


def test_conditional_flow_samples_per_context_row():
    flow = Flow([AutoregressiveMixtureFlow(2, 2, [8], output="logit", context_features=3,
                                           seed=0)], StandardNormal(2))
    ctx = torch.randn(5, 3)
    assert flow.sample(4, ctx).shape == (4, 5, 2)
    assert flow.distribution(ctx).sample((2,)).shape == (2, 5, 2)


def test_conditional_flow_scores_its_own_samples():
    """Samples of a conditional flow have shape sample_shape + batch_shape + (D,): log_prob
    broadcasts the (batch, C) context over the sample axes, as torch.distributions does."""
    flow = Flow([AutoregressiveMixtureFlow(2, 2, [8], output="logit", context_features=3,
                                           seed=0)], StandardNormal(2))
    ctx = torch.randn(5, 3)
    dist = flow.distribution(ctx)
    x = dist.sample((4,))
    by_row = torch.stack([flow.log_prob(x[i], ctx) for i in range(4)])
    torch.testing.assert_close(dist.log_prob(x), by_row)
    torch.testing.assert_close(flow.log_prob(x, ctx), by_row)
    with pytest.raises(ValueError, match="context must have shape"):
        flow.log_prob(x, torch.randn(4, 3))


@pytest.mark.parametrize("hidden_degrees", ["random", "sequential"])
def test_loaded_state_dict_samples_like_the_saved_model(hidden_degrees):
    """A model built with another seed (other random order and hidden degrees) and given a
    state dict runs the saved network exactly, its one-pass sampling solve included (the
    solve's degree table is read from the loaded masks)."""
    kw = dict(output="logit", order="random", hidden_degrees=hidden_degrees)
    saved = AutoregressiveMixtureFlow(5, 3, [16, 16], seed=0, **kw)
    loaded = AutoregressiveMixtureFlow(5, 3, [16, 16], seed=1, **kw)
    loaded.load_state_dict(saved.state_dict())
    z = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x_saved, lad_saved = saved.inverse(z)
        x, lad = loaded.inverse(z)
        loaded.one_pass = False
        x_d_pass, _ = loaded.inverse(z)
    assert torch.equal(x, x_saved) and torch.equal(lad, lad_saved)
    torch.testing.assert_close(x, x_d_pass, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_problem():
    t = AutoregressiveMixtureFlow(3, 2, [8], context_features=2)
    with pytest.raises(ValueError, match="x must have 3 features"):
        t(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="context is required"):
        t(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context must have shape"):
        t(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="x must be a floating-point"):
        t(torch.ones(4, 3, dtype=torch.int64), torch.randn(4, 2))
    with pytest.raises(ValueError, match="context was given"):
        MADE(3, [4])(torch.randn(2, 3), torch.randn(2, 1))
    with pytest.raises(ValueError, match="order must be a permutation"):
        MADE(3, [4], order=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="direction must be"):
        AutoregressiveMixtureFlow(3, 2, [8], direction="nice")
    with pytest.raises(ValueError, match="kind must be one of"):  # at construction
        AutoregressiveMixtureFlow(3, 2, [8], kind="cauchy")
    with pytest.raises(ValueError, match="output must be one of"):
        MixtureCDFFlow(3, 2, output="probit")
    with pytest.raises(ValueError, match="base has 2 features"):
        Flow([MixtureCDFFlow(3, 2)], StandardNormal(2))


@pytest.mark.parametrize("build, message", [
    (lambda: MixtureCDFFlow("2", 3), "features must be an int >= 1, got '2'"),
    (lambda: MixtureCDFFlow(2.0, 3), "features must be an int >= 1"),
    (lambda: MixtureCDFFlow(2, 3.5), "components must be an int >= 1"),
    (lambda: AutoregressiveMixtureFlow(2, "8", [16]), "components must be an int >= 1"),
    (lambda: AutoregressiveMixtureFlow(2.0, 8, [16]), "features must be an int >= 1"),
    (lambda: AutoregressiveMixtureFlow(2, 8, [16], context_features=-1),
     "context_features must be an int >= 1"),
    (lambda: AutoregressiveMixtureFlow(2, 8, [16], context_features=0),
     "context_features must be an int >= 1"),
    (lambda: AutoregressiveMixtureFlow(2, 8, [16], seed=1.5), "seed must be an int or None"),
    (lambda: MADE(2.5, [4]), "features must be an int >= 1"),
    (lambda: Logit(2, alpha="0.1"), "alpha must be a real number"),
    (lambda: Logit(2, alpha=math.nan), "alpha must be a real number"),
    (lambda: Permutation([1.9, 0.2]), "permutation must hold ints"),
    (lambda: Permutation([]), "permutation must not be empty"),
    (lambda: Permutation([0, 2]), "permutation must be a permutation of 0..n-1"),
])
def test_bad_constructor_arguments_name_the_problem(build, message):
    """ValueErrors naming the argument (before: raw TypeErrors, a RuntimeError for a
    negative context size, a zero-size context accepted with a warning, and a float
    permutation silently truncated to ints)."""
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_context_values_and_sample_sizes_name_the_problem():
    flow = Flow([AutoregressiveMixtureFlow(3, 2, [8], context_features=2, output="logit",
                                           seed=0)], StandardNormal(3))
    x, ctx = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="context must be a floating-point"):
        flow.log_prob(x, ctx.to(torch.int64))
    with pytest.raises(ValueError, match="context is on meta"):
        flow.log_prob(x, ctx.to("meta"))
    bad = ctx.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="context must be finite"):
        flow.log_prob(x, bad)
    with pytest.raises(ValueError, match="sample_shape must be a non-negative int"):
        flow.sample(-1, ctx)
    inf_x = x.clone()
    inf_x[2, 1] = float("inf")
    for direction in DIRECTIONS:  # logit F has no logabsdet at x = +-inf
        layer = AutoregressiveMixtureFlow(3, 2, [8], output="logit", direction=direction)
        with pytest.raises(ValueError, match="x must be finite for output='logit'"):
            layer(inf_x)
        # A flow on R gives that row density 0 (test_flow_contract checks it further).
        lp = Flow([layer], StandardNormal(3)).log_prob(inf_x)
        assert lp[2] == -math.inf and torch.isfinite(lp[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match="shape must be a non-negative int or a sequence"):
        StandardNormal(3).sample((2, -1))
    # Integer scalars of any kind are sizes, as torch.distributions takes them.
    assert flow.sample(torch.tensor(2), ctx).shape == (2, 4, 3)
    assert StandardNormal(3).sample((torch.tensor(2), 1)).shape == (2, 1, 3)
    # float64 data through a float32 conditional model: every layer runs in float64, the
    # context (of either dtype) cast to it; sampling with a float64 context likewise.
    for c in (ctx.double(), ctx):
        lp = flow.log_prob(x.double(), c)
        assert lp.dtype == torch.float64
        torch.testing.assert_close(lp.float(), flow.log_prob(x, ctx), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    s64 = flow.sample(3, ctx.double())
    torch.manual_seed(0)
    torch.testing.assert_close(s64, flow.sample(3, ctx), rtol=1e-4, atol=1e-4)


def test_mixture_of_gaussians_samples_follow_its_density():
    """MixtureOfGaussians.sample draws each value from the component it picked: per
    dimension, the empirical CDF of 1e5 samples against fastflow.mixture_cdf of the same
    (perturbed) parameters, by the Kolmogorov-Smirnov distance (about 0.003 expected at this
    size; 0.01 allowed)."""
    D, K, n = 3, 4, 100_000
    base = MixtureOfGaussians(D, K).double()
    _perturb(base, scale=1.0)  # unequal weights, locations and scales
    torch.manual_seed(0)
    z = base.sample(n)
    assert z.shape == (n, D)
    with torch.no_grad():
        F, _ = fastflow.mixture_cdf(z, base.logits, base.loc, base.log_scale, kind="gaussian",
                                    output="unit")
    F = F.sort(dim=0).values  # under the right distribution, uniform order statistics
    i = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(-1)
    ks = torch.maximum(i / n - F, F - (i - 1) / n).amax(0)
    assert (ks < 0.01).all(), f"Kolmogorov-Smirnov distances {ks.tolist()}"


@pytest.mark.parametrize("base", ["normal", "mog"])
def test_zero_samples_have_shape_zero_by_d(base):
    prior = StandardNormal(3) if base == "normal" else MixtureOfGaussians(3, 2)
    flow = Flow([AutoregressiveMixtureFlow(3, 2, [8], output="logit", seed=0)], prior)
    assert flow.sample(0).shape == (0, 3)
    assert flow.distribution().sample((0, 2)).shape == (0, 2, 3)


@pytest.mark.parametrize("cls", [Logit, Sigmoid])
def test_logit_rejects_values_outside_the_unit_interval(cls):
    """Unscaled pixels (0..255) would give NaN log-densities: a ValueError names them."""
    t = cls(2, 0.05)
    pixels = torch.tensor([[255.0, 0.5]])
    if cls is Logit:
        with pytest.raises(ValueError, match="x must lie in"):
            t(pixels)
    else:
        with pytest.raises(ValueError, match="z must lie in"):
            t.inverse(pixels)


@pytest.mark.parametrize("linear,head", [("dense", "dense"), ("kernel", "kernel"),
                                         ("kernel", "dense"), ("dense", "kernel")])
def test_every_made_route_matches_the_reference(linear, head, device, triton_backend,
                                                monkeypatch):
    """On a GPU, MADE's products go through cuBLAS or fastflow's kernels as GPU_ROUTE says
    (on a CPU both names mean the interpreted kernels): every route gives the reference's
    density and gradients."""
    from fastflow.ops import dispatch

    monkeypatch.setitem(dispatch.GPU_ROUTE, "linear", linear)
    monkeypatch.setitem(dispatch.GPU_ROUTE, "head", head)
    flow = AutoregressiveMixtureFlow(5, 3, [16, 16], order="random", seed=2).double().to(device)
    x = torch.randn(7, 5, dtype=torch.float64, device=device)
    z, lad = flow(x)
    grads = torch.autograd.grad(lad.sum() + z.sum(), list(flow.parameters()))
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    z_ref, lad_ref = flow(x)
    grads_ref = torch.autograd.grad(lad_ref.sum() + z_ref.sum(), list(flow.parameters()))
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(lad, lad_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


def test_mixture_parameter_gradients_join_in_one_cat():
    """MADE's (..., 3K) output is split, not sliced three times: its gradient is one cat,
    not three zeroed full-size tensors summed (a full pass over the output each)."""
    from torch.profiler import profile

    flow = AutoregressiveMixtureFlow(5, 3, [16, 16], seed=0)
    x = torch.randn(7, 5)
    with profile() as prof:
        z, lad = flow(x)
        (z.sum() + lad.sum()).backward()
    ops = {e.key: e.count for e in prof.key_averages()}
    assert "aten::slice_backward" not in ops
    params = flow._params(x, None)
    assert len({p.grad_fn for p in params}) == 1 and "Split" in type(params[0].grad_fn).__name__


@pytest.mark.parametrize("order", ["natural", "random"])
def test_first_dimension_starts_with_spread_locations(order):
    """The first dimension in the order sees no input: its mixture is the output bias alone,
    which starts with the locations spread over [-1, 1] (MixtureCDFFlow's), whatever the
    input; the other dimensions keep the layer's default bias (spreading them measured worse:
    docs/tuning.md, "Initial locations")."""
    D, K = 5, 4
    layer = AutoregressiveMixtureFlow(D, K, [16, 16], order=order, seed=3)
    first = int(torch.argmin(layer.made.input_degrees))
    out = layer.made(torch.randn(7, D)).view(7, D, 3 * K)
    spread = torch.linspace(-1.0, 1.0, K)
    assert torch.equal(out[:, first, K:2 * K], spread.expand(7, K))
    bias = layer.made.output.bias.view(D, 3 * K)[:, K:2 * K]
    others = [d for d in range(D) if d != first]
    assert bias[others].abs().max() <= 1.0 / math.sqrt(16)  # nn.Linear's default range
