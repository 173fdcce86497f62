"""Learning: a 2-D autoregressive flow fits two moons; variational dequantization beats uniform
dequantization on integer data. Small, seeded, CPU runs (seconds each)."""

import math

import pytest
import torch

import fastflow
from fastflow.data import rings, two_moons
from fastflow.distributions import StandardNormal
from fastflow.nn import (
    AutoregressiveMixtureFlow,
    Flow,
    Logit,
    MixtureCDFFlow,
    UniformDequantization,
    VariationalDequantization,
    dequantized_log_prob,
)


@pytest.fixture(autouse=True)
def _no_validation():
    fastflow.set_validate_args(False)
    yield
    fastflow.set_validate_args(True)


def _fit(loss_fn, params, steps, lr):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_2d_autoregressive_flow_learns_two_moons():
    g = torch.Generator().manual_seed(0)
    train, test = two_moons(4000, generator=g), two_moons(2000, generator=g)
    flow = Flow([AutoregressiveMixtureFlow(2, 8, [64, 64], output="logit", seed=0)],
                StandardNormal(2))

    def loss():
        idx = torch.randint(0, len(train), (256,), generator=g)
        return -flow.log_prob(train[idx]).mean()

    _fit(loss, flow.parameters(), steps=600, lr=5e-3)
    with torch.no_grad():
        nll = -flow.log_prob(test).mean().item()
    gauss = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    gauss_nll = -gauss.log_prob(test).mean().item()
    # measured: 0.61 nats against 1.87 for the best single Gaussian
    assert nll < 0.9 and nll < gauss_nll - 1.0


def _integer_pairs(n, g):
    """Correlated integers on 8 levels: x2 = x1 or x1 + 1 (entropy (log2 7 + 1)/2 bits/dim)."""
    a = torch.randint(0, 7, (n,), generator=g)
    return torch.stack([a, a + torch.randint(0, 2, (n,), generator=g)], -1)


def test_variational_dequantization_beats_uniform():
    g = torch.Generator().manual_seed(0)
    train, test = _integer_pairs(4000, g), _integer_pairs(2000, g)
    bpd = {}
    for name in ("uniform", "variational"):
        torch.manual_seed(0)
        model = Flow([Logit(2, alpha=1e-3),
                      AutoregressiveMixtureFlow(2, 8, [64, 64], output="logit", seed=0)],
                     StandardNormal(2))
        deq = UniformDequantization(2, 8) if name == "uniform" else \
            VariationalDequantization(2, 8, seed=0)

        def loss(model=model, deq=deq):
            idx = torch.randint(0, len(train), (256,), generator=g)
            return -dequantized_log_prob(model, deq, train[idx]).mean()

        _fit(loss, [*model.parameters(), *deq.parameters()], steps=800, lr=3e-3)
        with torch.no_grad():
            bound = torch.stack([dequantized_log_prob(model, deq, test) for _ in range(4)])
        bpd[name] = -bound.mean().item() / (2 * math.log(2))
    entropy = (math.log2(7) + 1) / 2
    # measured: uniform 2.06, variational 2.01 bits/dim; neither can beat the entropy
    assert entropy < bpd["variational"] < bpd["uniform"] - 0.01


def test_variational_noise_log_density_matches_its_sequential_density():
    deq = VariationalDequantization(3, 5, seed=1).double()
    x = torch.randint(0, 5, (6, 3))
    ctx = x.double() / 4
    u, log_q = deq.noise.rsample_and_log_prob(1, ctx)
    assert ((u > 0) & (u < 1)).all()
    torch.testing.assert_close(log_q[0], deq.noise.log_prob(u[0], ctx))


def test_dequantizers_reject_bad_data():
    deq = UniformDequantization(2, 4)
    with pytest.raises(ValueError, match="x must be an integer tensor"):
        deq(torch.rand(3, 2))
    with pytest.raises(ValueError, match=r"x must lie in \[0, 3\]"):
        deq(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="x must have 2 features"):
        deq(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="levels must be an int >= 2"):
        UniformDequantization(2, 1)
    with pytest.raises(ValueError, match="features must be an int >= 1"):
        UniformDequantization(2.5, 4)
    # hidden sizes as everywhere else: one int is one layer
    assert len(VariationalDequantization(2, 4, hidden_features=16).noise.transforms[1]
               .made.layers) == 1


def test_uniform_dequantization_stays_in_the_cell():
    x = torch.randint(0, 4, (100, 2))
    y, log_q = UniformDequantization(2, 4)(x)
    assert ((y * 4).floor().long() == x).all()
    torch.testing.assert_close(log_q, torch.full((100,), 2 * math.log(4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantized_values_never_touch_a_cells_end(dtype, monkeypatch):
    """Noise at the ends of [0, 1) that rounding carries onto a cell's end (255 + u rounds to
    256 in float32 for u > 1 - 2^-17; u = 0 at x = 0 gives y = 0) stays strictly inside the
    cell, so a Logit with alpha = 0 gives a finite bound. Before, 7e-6 of float32 draws at
    x = 255 of 256 levels gave y = 1 and a bound of -inf."""
    ends = torch.tensor([0.0, 1.0 - 2.0 ** -24, 0.0, 1.0 - 2.0 ** -24], dtype=dtype)
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: ends.reshape(shape).to(kw["dtype"]))
    x = torch.tensor([[0], [255], [0], [255]])
    y, _ = UniformDequantization(1, 256)(x, dtype=dtype)
    assert ((y > x / 256) & (y < (x + 1) / 256)).all()
    flow = Flow([Logit(1, alpha=0.0), MixtureCDFFlow(1, 2)], StandardNormal(1)).to(dtype)
    y_bound = flow.log_prob(y)
    assert torch.isfinite(y_bound).all()


def test_toy_data_shapes_and_errors():
    g = torch.Generator().manual_seed(0)
    assert two_moons(10, generator=g).shape == (10, 2)
    r = rings(1000, noise=0.0, generator=g)
    radii = r.norm(dim=-1)
    assert torch.isclose(radii.unsqueeze(-1), torch.tensor([0.5, 1.0, 1.5])).any(-1).all()
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        two_moons(0)
    # radii: NaN gave all-NaN points; an empty or scalar one raised torch's or Python's error.
    own = rings(100, noise=0.0, radii=[2, 3], generator=g).norm(dim=-1)
    assert torch.isclose(own.unsqueeze(-1), torch.tensor([2.0, 3.0])).any(-1).all()
    for bad in ([math.nan], (), 1.0, [-1.0], ["a"], [math.inf]):
        with pytest.raises(ValueError, match="radii must be a non-empty sequence of finite"):
            rings(10, radii=bad)
