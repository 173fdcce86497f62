"""fastflow.flows' one-line constructors and the coupling mixture-CDF layer: structure,
normalisation by quadrature, log-determinants against autograd Jacobians, round trips,
contexts, replaceable conditioners and bad arguments."""

import pytest
import torch
from torch import nn

import fastflow
from fastflow.flows import IAF, MAF, Coupling, MixtureCDF
from fastflow.nn import CouplingMixtureFlow, Flow

CONSTRUCTORS = {"MAF": MAF, "IAF": IAF, "MixtureCDF": MixtureCDF, "Coupling": Coupling}


def _build(name, features=3, context=0, scale=0.2, **kw):
    if name != "MixtureCDF":
        kw.setdefault("hidden_features", (16,))
    flow = CONSTRUCTORS[name](features, context=context, transforms=2, components=3, **kw)
    flow = flow.double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_one_line_flows_are_flows_whose_call_is_a_distribution(name):
    flow = _build(name)
    assert isinstance(flow, Flow)
    dist = flow()
    assert isinstance(dist, torch.distributions.Distribution)
    x = dist.sample((6,))
    assert x.shape == (6, 3)
    torch.testing.assert_close(dist.log_prob(x), flow.log_prob(x))
    s, lp = flow.rsample_and_log_prob(5)
    torch.testing.assert_close(lp, flow.log_prob(s), rtol=1e-9, atol=1e-9)
    z, lad = flow.transform(x)
    torch.testing.assert_close(z, Flow.forward(flow, x)[0])
    (-flow.log_prob(x).mean()).backward()
    assert all(p.grad is not None for p in flow.parameters())
    assert name in repr(flow).splitlines()[0]


@pytest.mark.parametrize("name", ["MAF", "Coupling"])
@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_two_dimensional_flows_density_matches_their_samples(name, kind):
    """The density's mass in a box (quadrature) equals the fraction of the flow's own samples
    in it (these perturbed flows have heavy tails: up to 8 % lies outside)."""
    flow = _build(name, features=2, kind=kind)
    g = torch.linspace(-12, 12, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    with torch.no_grad():
        p = flow.log_prob(grid).exp().reshape(801, 801)
    mass = torch.trapezoid(torch.trapezoid(p, g, dim=1), g).item()
    inside = (flow.sample(200_000).abs() <= 12).all(-1).double().mean().item()
    assert mass > 0.5
    assert abs(mass - inside) < 0.004  # 4 standard errors of the sampled fraction and more


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_coupling_layer_logabsdet_is_its_jacobian(backend, kind):
    layer = CouplingMixtureFlow(5, 3, (8,), kind=kind).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, 5, dtype=torch.float64)
    z, lad = layer(x)
    torch.testing.assert_close(z[:, :2], x[:, :2])  # the conditioner's half passes through
    for i in range(4):
        J = torch.autograd.functional.jacobian(lambda v: layer(v.unsqueeze(0))[0][0], x[i])
        assert abs(torch.linalg.slogdet(J)[1].item() - lad[i].item()) < 1e-9
    x_back, lad_inv = layer.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lad_inv, -lad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["MAF", "IAF", "Coupling"])
def test_conditional_one_line_flows(name):
    flow = _build(name, features=3, context=2, scale=0.05)
    ctx = torch.randn(4, 2, dtype=torch.float64)
    dist = flow(ctx)
    assert dist.batch_shape == (4,)
    x = dist.sample((5,))
    assert x.shape == (5, 4, 3)
    lp = dist.log_prob(x)
    other = flow(ctx + 1.0).log_prob(x)
    assert lp.shape == (5, 4) and not torch.allclose(lp, other)  # the context matters
    with pytest.raises(ValueError, match="call it with a context"):
        flow()
    with pytest.raises(ValueError, match="call it without one"):
        _build(name)(ctx)


def test_coupling_takes_a_replacement_network():
    built = []

    def network(n_in, n_out):
        net = nn.Sequential(nn.Linear(n_in, 7), nn.Tanh(), nn.Linear(7, n_out))
        built.append((n_in, n_out, net))
        return net

    flow = Coupling(5, context=1, transforms=3, components=2, network=network)
    assert [(a, b) for a, b, _ in built] == [(3, 18)] * 3
    assert all(any(m is net for m in flow.modules()) for _, _, net in built)
    ctx = torch.randn(4, 1)
    x = flow(ctx).sample()
    assert x.shape == (4, 5)
    with pytest.raises(ValueError, match="network must return 18 outputs"):
        CouplingMixtureFlow(5, 2, network=nn.Linear(2, 5))(torch.randn(3, 5))


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_wider_data_run_every_layer_in_their_dtype(name):
    """float64 data into a float32 flow computes in float64 (the coupling's conditioner with
    its weights cast, as MADE's layers): the float64 copy of the flow gives the same values,
    and the float32 parameters get their gradients."""
    torch.manual_seed(0)
    flow = _build(name).float()
    wide = _build(name)
    wide.load_state_dict(flow.state_dict())
    x = torch.randn(6, 3, dtype=torch.float64)
    log_p = flow.log_prob(x)
    assert log_p.dtype == torch.float64
    torch.testing.assert_close(log_p, wide.log_prob(x), rtol=0, atol=0)
    log_p.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in flow.parameters())


def test_a_conditioner_with_buffers_runs_in_the_datas_dtype():
    """A replacement conditioner with batch norm (buffers, updated in training) in a float32
    flow given float64 data: the values of the float64 copy of the flow, and the running
    statistics updated as that copy's are. Before, the float32 buffers met float64
    activations: 'expected scalar type Double but found Float'."""
    import copy

    from fastflow.distributions import StandardNormal

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 12))
    flow = Flow([CouplingMixtureFlow(3, 2, network=net)], StandardNormal(3))
    wide = copy.deepcopy(flow).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    for mode in ("eval", "train"):  # eval first: then both hold the same running statistics
        getattr(flow, mode)(), getattr(wide, mode)()
        torch.testing.assert_close(flow.log_prob(x), wide.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_mean.double(), wide.transforms[0].network[1]
                               .running_mean, rtol=1e-6, atol=1e-7)
    assert net[1].running_mean.dtype == torch.float32 and net[1].num_batches_tracked == 1


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="transforms must be an int >= 1"):
        MAF(3, transforms=0)
    with pytest.raises(ValueError, match="features must be an int >= 1"):
        IAF(2.5)
    with pytest.raises(ValueError, match="takes no context"):
        MixtureCDF(3, context=2)
    with pytest.raises(ValueError, match="features must be >= 2 for a coupling"):
        Coupling(1)
    with pytest.raises(ValueError, match="output must be 'logit' for a coupling"):
        CouplingMixtureFlow(4, 2, output="unit")
    # Hidden sizes: one int is one layer, as in MADE; zero or negative sizes (which left a
    # coupling's conditioner ignoring its input) are refused for every constructor.
    for name in ("MAF", "IAF", "Coupling"):
        assert CONSTRUCTORS[name](4, hidden_features=16).log_prob(torch.randn(3, 4)).shape == (3,)
        if name == "Coupling":  # no hidden layer: a linear conditioner
            assert Coupling(4, hidden_features=()).log_prob(torch.randn(3, 4)).shape == (3,)
        for bad in ((0,), (64, 0), (-3,), 2.5, "64", None):
            with pytest.raises(ValueError, match="hidden_features must be positive sizes"):
                CONSTRUCTORS[name](4, hidden_features=bad)
    with pytest.raises(ValueError, match="hidden_features must be positive sizes"):
        MixtureCDF(2, hidden_features=None)
    for name in ("MAF", "IAF"):
        for bad in ("a", 1.5, True):
            with pytest.raises(ValueError, match="seed must be an int or None"):
                CONSTRUCTORS[name](2, seed=bad)


def test_a_bad_coupling_network_names_the_problem():
    """A network factory that is not callable, returns something other than a module, or
    builds a module of the wrong input width: ValueErrors that say so (before: raw
    TypeError, AttributeError, RuntimeError, or a silent fall-back to the default MLP)."""
    with pytest.raises(ValueError, match="network must be callable"):
        Coupling(4, network=5)
    with pytest.raises(ValueError, match=r"network\(2, 48\) must return a torch.nn.Module, "
                                         r"got NoneType"):
        Coupling(4, components=8, network=lambda i, o: None)
    with pytest.raises(ValueError, match="must return a torch.nn.Module, got function"):
        Coupling(4, network=lambda i, o: (lambda x: x))
    with pytest.raises(ValueError, match="network must be a torch.nn.Module"):
        CouplingMixtureFlow(4, 2, network=lambda x: x)
    wrong = Coupling(4, network=lambda i, o: torch.nn.Linear(i + 1, o))
    with pytest.raises(ValueError, match=r"the network failed on inputs of shape \(3, 2\)"):
        wrong.log_prob(torch.randn(3, 4))
    right = Coupling(4, components=2, network=lambda i, o: torch.nn.Linear(i, o))
    assert right.log_prob(torch.randn(3, 4)).shape == (3,)


def test_fit_trains_a_one_line_flow():
    from fastflow.data import two_moons

    torch.manual_seed(0)
    flow = Coupling(2, transforms=4, components=4, hidden_features=(32,))
    data = two_moons(2000)
    before = -flow.log_prob(data).mean().item() / 2
    history = fastflow.fit(flow, data, steps=150, batch_size=128, lr=5e-3, validation=0.1,
                           progress=False, seed=0)
    assert history.best_val_loss < before - 0.3


def test_distribution_value_and_context_shapes_are_named_as_the_user_gave_them():
    """A scalar or wrongly sized value is named "value" with its own shape; a context of the
    wrong width is refused when the distribution is made, with the shape the user passed
    (before: "x must have 2 features ... got shape (1,)" and an internal (1, 4, 3))."""
    flow = MAF(2, context=3, transforms=1, components=3, hidden_features=(8,))
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 3\).*got \(4, 5\)"):
        flow(torch.randn(4, 5))
    plain = MAF(2, transforms=1, components=3, hidden_features=(8,))()
    for value, shape in ((torch.tensor(0.5), r"\(\)"), (torch.randn(3), r"\(3,\)")):
        with pytest.raises(ValueError, match=rf"value must have shape \(\.\.\., 2\).*{shape}"):
            plain.log_prob(value)
    assert flow(torch.randn(4, 3)).sample().shape == (4, 2)
