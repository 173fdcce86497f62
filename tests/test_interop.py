"""fastflow inside torch.distributions and pyro: transforms as torch Transforms, any torch base
with event shape (D,), FlowDistribution's batch shapes, and a pyro SVI step."""

import warnings

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution

from fastflow.distributions import StandardNormal
from fastflow.nn import (
    AutoregressiveMixtureFlow,
    Compose,
    Flow,
    Logit,
    MixtureCDFFlow,
    Reverse,
    Transform,
)


def _chain(kind="logistic"):
    torch.manual_seed(0)
    chain = Compose([AutoregressiveMixtureFlow(2, 3, [8], kind=kind, seed=0), Reverse(2),
                     MixtureCDFFlow(2, 3, kind=kind)]).double()
    with torch.no_grad():
        for p in chain.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return chain


def _normal(D, dtype=torch.float64):
    return Independent(Normal(torch.zeros(D, dtype=dtype), torch.ones(D, dtype=dtype)), 1)


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_transformed_distribution_matches_the_flow(kind):
    chain = _chain(kind)
    flow = Flow(chain, StandardNormal(2)).double()
    td = TransformedDistribution(_normal(2), [chain.as_transform()])
    x = torch.randn(16, 2, dtype=torch.float64)
    torch.testing.assert_close(td.log_prob(x), flow.log_prob(x), rtol=1e-12, atol=1e-12)
    t = chain.as_transform()
    z = t.inv(x)
    torch.testing.assert_close(z, flow(x)[0])
    torch.testing.assert_close(t(z), x, rtol=1e-9, atol=1e-9)
    assert td.rsample((3, 4)).shape == (3, 4, 2)


def test_adapter_log_abs_det_jacobian_is_the_base_to_data_jacobian():
    """log|det dx/dz| of the adapter's call against an autograd Jacobian, per sample."""
    t = _chain().as_transform(cache_size=0)
    z = torch.randn(5, 2, dtype=torch.float64)
    x = t(z)
    lad = t.log_abs_det_jacobian(z, x)
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda v: t(v.unsqueeze(0))[0], z[i])
        assert abs(torch.linalg.slogdet(J)[1].item() - lad[i].item()) < 1e-9


def test_adapter_domains_follow_the_transform_ranges():
    unit_first = Compose([Logit(2), MixtureCDFFlow(2, 3)]).as_transform()
    assert unit_first.codomain.check(torch.tensor([[0.2, 0.9]])).item()
    assert not unit_first.codomain.check(torch.tensor([[1.5, 0.5]])).item()
    assert unit_first.domain.check(torch.tensor([[-40.0, 40.0]])).item()
    assert unit_first.event_dim == 1 and unit_first.bijective
    with_unit_output = MixtureCDFFlow(2, 3, output="unit").as_transform()
    assert not with_unit_output.domain.check(torch.tensor([[2.0, 0.5]])).item()


def test_flow_takes_any_torch_base_with_event_shape_d():
    chain = _chain()
    ours = Flow(chain, StandardNormal(2)).double()
    theirs = Flow(chain, _normal(2))
    x = torch.randn(8, 2, dtype=torch.float64)
    torch.testing.assert_close(theirs.log_prob(x), ours.log_prob(x), rtol=1e-12, atol=1e-12)
    s, lp = theirs.rsample_and_log_prob((3,))
    assert s.shape == (3, 2)
    torch.testing.assert_close(lp, theirs.log_prob(s), rtol=1e-8, atol=1e-8)


def test_a_float32_torch_base_samples_in_a_float64_flows_dtype():
    """A torch.distributions base keeps its own (float32) dtype when the flow is moved to
    float64; the flow's samples and their log-density are still float64 (promote, never
    demote), equal to log_prob of the samples. Before, the draws went through the layers in
    float32 (the layers cast their weights down) and log_p was 1e-7 off."""
    from fastflow.nn.coupling import CouplingMixtureFlow

    torch.manual_seed(0)
    for layer in (AutoregressiveMixtureFlow(2, 3, [8], seed=0), CouplingMixtureFlow(2, 3, [8])):
        flow = Flow([layer], _normal(2, torch.float32)).double()
        x, lp = flow.rsample_and_log_prob(64)
        assert x.dtype == lp.dtype == torch.float64
        torch.testing.assert_close(lp, flow.log_prob(x), rtol=1e-12, atol=1e-12)
        assert flow.distribution().sample((2,)).dtype == torch.float64


def test_flow_distribution_expand_broadcast_and_moments():
    flow = Flow(_chain(), StandardNormal(2)).double()
    d = flow.distribution().expand((4,))
    assert d.batch_shape == (4,) and d.event_shape == (2,)
    assert d.sample((3,)).shape == (3, 4, 2)
    x = torch.randn(2, dtype=torch.float64)
    assert d.log_prob(x).shape == (4,)
    torch.testing.assert_close(d.log_prob(x), flow.log_prob(x).expand(4))
    assert d.expand((3, 4)).batch_shape == (3, 4)  # as a tensor expands: leading sizes
    for bad in ((2,), (4, 2)):  # not an expansion of (4,): refused, as torch refuses it
        with pytest.raises(ValueError, match=r"not an expansion of .* batch shape \(4,\)"):
            d.expand(bad)
    for name in ("mean", "variance", "stddev"):
        with pytest.raises(NotImplementedError, match=r"estimate it from samples"):
            getattr(d, name)
    with pytest.raises(NotImplementedError, match=r"dist.log_prob"):
        d.entropy()
    # KL divergence either way, or between flows: the Monte Carlo estimate, not torch's
    # generic "no KL registered" (and no ambiguity warning for two flows).
    normal = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), 1.0), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p, q in ((d, normal), (normal, d), (d, d)):
            with pytest.raises(NotImplementedError, match=r"p.log_prob\(x\) - q.log_prob"):
                torch.distributions.kl_divergence(p, q)


def test_conditional_flow_distribution_broadcasts_against_its_batch():
    flow = Flow([AutoregressiveMixtureFlow(2, 3, [8], context_features=3, seed=0)],
                StandardNormal(2))
    ctx = torch.randn(4, 3)
    d = flow.distribution(ctx)
    x = torch.randn(2)
    lp = d.log_prob(x)  # one point scored under each of the 4 contexts
    assert lp.shape == (4,)
    torch.testing.assert_close(lp, flow.log_prob(x.expand(4, 2), ctx))
    assert d.log_prob(torch.randn(7, 1, 2)).shape == (7, 4)
    e = d.expand((5, 4))
    assert e.sample((2,)).shape == (2, 5, 4, 2)
    assert e.log_prob(x).shape == (5, 4)


def test_pyro_latent_site_and_an_svi_step():
    """A FlowDistribution as the guide of a latent site: pyro samples it, scores it, and one
    SVI step moves the flow's parameters."""
    pyro = pytest.importorskip("pyro")  # in the test extras; an optional peer for users
    import pyro.distributions as pdist
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()
    flow = Flow([AutoregressiveMixtureFlow(2, 3, [8], seed=0), Reverse(2)], StandardNormal(2))

    def model(data):
        z = pyro.sample("z", pdist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("obs", pdist.Normal(z, 0.5).to_event(1), obs=data)

    def guide(data):
        pyro.module("flow", flow)
        pyro.sample("z", flow.distribution())

    data = torch.randn(20, 2) + 1.0
    before = [p.detach().clone() for p in flow.parameters()]
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    loss = svi.step(data)
    assert torch.isfinite(torch.tensor(loss))
    assert any((p - b).abs().max() > 0 for p, b in zip(flow.parameters(), before, strict=True))
    trace = pyro.poutine.trace(guide).get_trace(data)
    z = trace.nodes["z"]["value"]
    assert z.shape == (2,)
    torch.testing.assert_close(trace.nodes["z"]["fn"].log_prob(z), flow.log_prob(z))


def test_torch_uniform_bases_with_per_feature_bounds():
    """Uniform(zeros(D), ones(D)) is the unit cube: a unit-output flow over it is valid; a
    cube of other bounds or a logit output is refused with the range named."""
    unit = MixtureCDFFlow(3, 3, output="unit")
    cube = Independent(torch.distributions.Uniform(torch.zeros(3), torch.ones(3)), 1)
    flow = Flow([unit], cube)
    x = torch.randn(5, 3)
    torch.testing.assert_close(flow.log_prob(x), unit(x)[1])  # the cube's density is 1
    with pytest.raises(ValueError, match="maps onto R but the base Independent"):
        Flow([MixtureCDFFlow(3, 3)], cube)
    wide = Independent(torch.distributions.Uniform(-torch.ones(3), torch.ones(3)), 1)
    with pytest.raises(ValueError, match="maps onto \\[0, 1\\] but the base Independent"):
        Flow([unit], wide)


def test_a_base_with_a_batch_shape_is_refused():
    base = Independent(Normal(torch.zeros(4, 2), 1.0), 1)
    with pytest.raises(ValueError, match=r"base must have batch shape \(\), got \(4,\)"):
        Flow([MixtureCDFFlow(2, 3)], base)


def test_adapter_broadcasts_its_context_as_the_flow_does():
    flow = Flow([AutoregressiveMixtureFlow(3, 3, [8], context_features=2, seed=0)],
                StandardNormal(3)).double()
    ctx = torch.randn(5, 2, dtype=torch.float64)
    base = Independent(Normal(torch.zeros(5, 3, dtype=torch.float64), 1.0), 1)
    td = TransformedDistribution(base, [flow.transforms[0].as_transform(ctx)])
    x = td.rsample((4,))
    assert x.shape == (4, 5, 3)
    torch.testing.assert_close(td.log_prob(x), flow.log_prob(x, ctx))


def test_flow_distribution_rsample_and_log_prob_and_bad_values():
    flow = Flow([AutoregressiveMixtureFlow(2, 3, [8], context_features=3, seed=0)],
                StandardNormal(2)).double()
    d = flow.distribution(torch.randn(6, 3, dtype=torch.float64))
    x, log_p = d.rsample_and_log_prob((4,))
    assert x.shape == (4, 6, 2) and log_p.shape == (4, 6)
    torch.testing.assert_close(log_p, d.log_prob(x))
    with pytest.raises(ValueError, match=r"value of shape \(5, 2\) does not broadcast against "
                                         r"the batch shape \(6,\)"):
        d.log_prob(torch.randn(5, 2, dtype=torch.float64))


def test_a_context_no_transform_takes_is_refused():
    flow = Flow([MixtureCDFFlow(2, 3), Compose([Reverse(2), MixtureCDFFlow(2, 3)])],
                StandardNormal(2))
    for call in (lambda: flow.log_prob(torch.randn(5, 2), torch.randn(5, 1)),
                 lambda: flow.sample(3, torch.randn(5, 1))):
        with pytest.raises(ValueError, match="no transform of this flow takes one"):
            call()


class _Shift(Transform):
    """A user's conditional transform that does not declare ``takes_context``."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x, context=None):
        return x - context, x.new_zeros(x.shape[:-1])

    def inverse(self, z, context=None):
        return z + context, z.new_zeros(z.shape[:-1])


def test_a_transform_that_does_not_say_may_take_a_context():
    """Only transforms that say they take no context make the flow refuse one: a subclass
    that does not say is given it, alone or inside a Compose."""
    for flow in (Flow([_Shift(2)], StandardNormal(2)),
                 Flow([MixtureCDFFlow(2, 3), Compose([Reverse(2), _Shift(2)])],
                      StandardNormal(2))):
        x, c = torch.randn(5, 2), torch.randn(5, 2)
        z = flow(x, c)[0]
        torch.testing.assert_close(flow.log_prob(x, c), StandardNormal(2).log_prob(z)
                                   + flow(x, c)[1])
    assert Compose([Reverse(2), MixtureCDFFlow(2, 3)]).takes_context is False
    assert Compose([Reverse(2), _Shift(2)]).takes_context is None
    assert AutoregressiveMixtureFlow(2, 3, [8], context_features=1).takes_context is True


def test_pyro_plates_expand_the_wrapped_flow_and_refuse_the_bare_one():
    """pyro's plates expand only pyro distributions: the bare FlowDistribution inside a plate
    it does not fit is refused (not drawn with the wrong shape); pyro's own wrapper and an
    expanded distribution give one draw per plate element."""
    pyro = pytest.importorskip("pyro")
    from pyro.contrib.zuko import ZukoToPyro

    flow = Flow([AutoregressiveMixtureFlow(2, 3, [8], seed=0)], StandardNormal(2))

    def model(make):
        with pyro.plate("data", 10):
            return pyro.sample("z", make(flow.distribution()))

    with pytest.raises(ValueError, match="pyro.plate 'data' .*ZukoToPyro"):
        model(lambda d: d)
    for make in (ZukoToPyro, lambda d: d.expand((10,))):
        trace = pyro.poutine.trace(model).get_trace(make)
        trace.compute_log_prob()
        z = trace.nodes["z"]["value"]
        assert z.shape == (10, 2) and trace.nodes["z"]["log_prob"].shape == (10,)
        torch.testing.assert_close(trace.nodes["z"]["log_prob"], flow.log_prob(z))
