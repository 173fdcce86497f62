"""What a Flow promises its user: valid by construction (the last transform's range is the
base's support), never a NaN log-density for finite data, computation in the wider of the
data's and the flow's dtypes, clear errors for what it cannot take, and sample shapes."""

import math
import re

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

import fastflow
from fastflow.distributions import MixtureOfGaussians, StandardNormal, Uniform
from fastflow.nn import (
    AutoregressiveMixtureFlow,
    Compose,
    Flow,
    Logit,
    MixtureCDFFlow,
    Permutation,
    Reverse,
    Sigmoid,
    UniformDequantization,
    dequantized_log_prob,
)


def _perturb(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("case", ["unit-normal", "unit-mog", "unit-torch-normal",
                                  "logit-uniform", "sigmoid-normal", "ar-unit-normal"])
def test_flow_refuses_a_last_transform_whose_range_is_not_the_base_support(case):
    """Unit output into a base on R integrates to less than one; logit output into a
    Uniform base is -inf almost everywhere. Both are refused, naming the output to use."""
    normal2 = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    cases = {
        "unit-normal": ([MixtureCDFFlow(2, 3, output="unit")], StandardNormal(2),
                        "output='logit'"),
        "unit-mog": ([MixtureCDFFlow(2, 3, output="unit")], MixtureOfGaussians(2, 2),
                     "output='logit'"),
        "unit-torch-normal": ([MixtureCDFFlow(2, 3, output="unit")], normal2,
                              "output='logit'"),
        "logit-uniform": ([MixtureCDFFlow(2, 3)], Uniform(2), "output='unit'"),
        "sigmoid-normal": ([MixtureCDFFlow(2, 3), Sigmoid(2)], StandardNormal(2),
                           "transform onto R"),
        "ar-unit-normal": ([AutoregressiveMixtureFlow(2, 3, [8], output="unit"), Reverse(2)],
                           StandardNormal(2), "output='logit'"),
    }
    transforms, base, fix = cases[case]
    with pytest.raises(ValueError, match=re.escape(fix)):
        Flow(transforms, base)


def test_torch_bases_are_read_through_their_constraint_wrappers():
    """A MixtureSameFamily base on R^D (its support wraps an independent real constraint) is
    accepted; a base on neither R nor [0, 1] is refused naming its support, without advice
    to switch the output (which would not help)."""
    from torch.distributions import Categorical, LogNormal, MixtureSameFamily

    mix = MixtureSameFamily(Categorical(torch.ones(2)),
                            Independent(Normal(torch.randn(2, 2), torch.ones(2, 2)), 1))
    flow = Flow([MixtureCDFFlow(2, 3)], mix)
    assert torch.isfinite(flow.log_prob(flow.sample(5))).all()
    positive = Independent(LogNormal(torch.zeros(2), torch.ones(2)), 1)
    with pytest.raises(ValueError, match="GreaterThan") as info:
        Flow([MixtureCDFFlow(2, 3)], positive)
    assert "build it with" not in str(info.value)


def test_flow_refuses_a_transform_given_values_outside_its_domain():
    with pytest.raises(ValueError, match=r"transform 1, Logit, takes values in \[0, 1\]"):
        Flow([MixtureCDFFlow(2, 3), Logit(2)], StandardNormal(2))
    # The same pieces in a valid order, nested in a Compose, and a permutation in between.
    Flow([Logit(2), Compose([MixtureCDFFlow(2, 3), Reverse(2)])], StandardNormal(2))
    Flow([MixtureCDFFlow(2, 3, output="unit"), Reverse(2)], Uniform(2))
    Flow([Reverse(2)], Uniform(2))  # no transform fixes a range: nothing to check


@pytest.mark.parametrize("case", ["unit-then-sigmoid", "unit-then-mixture"])
def test_flow_refuses_a_transform_on_r_given_values_in_the_unit_interval(case):
    """A transform on R fed only [0, 1] maps onto part of its range: the density would
    integrate to 0.23 and 0.31 here."""
    unit = MixtureCDFFlow(2, 3, output="unit")
    transforms, base = {
        "unit-then-sigmoid": ([unit, Sigmoid(2)], Uniform(2)),
        "unit-then-mixture": ([unit, MixtureCDFFlow(2, 3)], StandardNormal(2)),
    }[case]
    with pytest.raises(ValueError, match=r"transform 1, .* takes values in R but transform 0, "
                                         r"MixtureCDFFlow\(output='unit'\), gives values in "
                                         r"\[0, 1\] only.*output='logit'"):
        Flow(transforms, base)


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_the_shortest_flow_is_a_normalized_density(backend, kind):
    """``Flow([MixtureCDFFlow(1, 3)], StandardNormal(1))``, defaults only, integrates to one
    (it was 0.34 when "unit" was the default output)."""
    flow = Flow([MixtureCDFFlow(1, 3, kind=kind)], StandardNormal(1)).double()
    _perturb(flow)
    grid = torch.linspace(-60, 60, 120001, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        p = flow.log_prob(grid).exp()
    assert abs(torch.trapezoid(p, grid[:, 0]).item() - 1.0) < 1e-6
    assert flow.sample(5).shape == (5, 1)  # and it samples (unit output could not)


def test_repr_shows_kind_output_components_and_hidden_sizes():
    flow = Flow([AutoregressiveMixtureFlow(3, 5, [16, 8], kind="gaussian", seed=0),
                 Reverse(3), MixtureCDFFlow(3, 4)], MixtureOfGaussians(3, 2))
    text = repr(flow)
    for part in ("components=5", "kind='gaussian'", "output='logit'", "hidden_features=[16, 8]",
                 "direction='maf'", "MixtureCDFFlow(features=3, components=4, kind='logistic'",
                 "Reverse(features=3)", "MixtureOfGaussians(features=3, components=2)"):
        assert part in text, part


def _steep_far_flow():
    """A two-layer MAF whose second dimension's log-scales fall linearly with |x_1| (all
    hidden weights positive, the log-scale rows of the output layer negative): far from the
    origin they pass -88, where 1/s overflows float32, as a trained flow's do far from its
    data."""
    K = 4
    flow = Flow([AutoregressiveMixtureFlow(2, K, [16, 16], output="logit", seed=0), Reverse(2),
                 AutoregressiveMixtureFlow(2, K, [16, 16], output="logit", seed=1)],
                StandardNormal(2))
    with torch.no_grad():
        for t in (flow.transforms[0], flow.transforms[2]):
            for layer in t.made.layers:
                layer.weight.abs_()
            w = t.made.output.weight.view(2, 3 * K, -1)
            w[:, 2 * K:].abs_().neg_()
    return flow


@pytest.mark.parametrize("validate", [True, False])
def test_log_prob_far_from_the_data_is_never_nan(validate):
    """On a grid out to +-300 the float32 log-density is finite wherever float64's is above
    -1e30, -inf elsewhere, and never NaN, with validation on (no spurious "not finite"
    error either) or off. Before, rows whose values overflowed inside the chain gave NaN."""
    flow = _steep_far_flow()
    grid = torch.linspace(-300, 300, 201)
    x = torch.cartesian_prod(grid, grid)
    previous = fastflow.get_validate_args()
    fastflow.set_validate_args(validate)
    try:
        with torch.no_grad():
            lp = flow.log_prob(x)
            lp64 = flow.double().log_prob(x.double())
    finally:
        fastflow.set_validate_args(previous)
    assert not lp.isnan().any()
    assert not lp64.isnan().any()
    assert torch.isneginf(lp).any()  # the case arises on this grid
    representable = lp64 > -1e30
    assert representable.float().mean() > 0.2
    assert torch.isfinite(lp[representable]).all()
    assert ((lp == -math.inf) | torch.isfinite(lp)).all()
    # Where both are moderate, float32 follows float64 (the grid is far out: loose).
    near = lp64 > -1e4
    rel = (lp.double() - lp64).abs() / lp64.abs().clamp(min=1.0)
    assert rel[near].median() < 1e-4


def test_a_nan_row_stays_nan_and_others_are_untouched():
    flow = _steep_far_flow()
    x = torch.randn(4, 2)
    x[1, 0] = float("nan")
    previous = fastflow.get_validate_args()
    fastflow.set_validate_args(False)
    try:
        lp = flow.log_prob(x)
    finally:
        fastflow.set_validate_args(previous)
    assert lp[1].isnan() and torch.isfinite(lp[[0, 2, 3]]).all()
    with pytest.raises(ValueError, match="contains NaN|must be finite"):
        flow.log_prob(x)


@pytest.mark.parametrize("validate", [True, False])
def test_infinite_rows_on_r_get_minus_inf_with_zero_gradient(validate):
    """A row holding +-inf (as a sample that overflowed does) has density 0 on R: -inf,
    its gradient zero, the other rows untouched; log_prob agrees with rsample_and_log_prob
    on the flow's own overflowed samples. Before, validation raised "must be finite" and,
    without it, the row was NaN."""
    flow = fastflow.flows.MAF(2, transforms=2, hidden_features=[16], seed=0)
    x = torch.tensor([[math.inf, 0.5], [0.3, -math.inf], [0.1, 0.2]], requires_grad=True)
    previous = fastflow.get_validate_args()
    fastflow.set_validate_args(validate)
    try:
        lp = flow().log_prob(x)
        lp.sum().backward()
        lp_finite = flow().log_prob(x[2:].detach())
    finally:
        fastflow.set_validate_args(previous)
    assert lp[:2].tolist() == [-math.inf, -math.inf]
    torch.testing.assert_close(lp[2:], lp_finite)
    assert (x.grad[:2] == 0).all() and torch.isfinite(x.grad).all()
    # The flow's own samples: scale a layer up until some overflow to +-inf.
    torch.manual_seed(5)
    flow = fastflow.flows.Coupling(2, transforms=2, hidden_features=[16])
    _perturb(flow, 0.5)
    with torch.no_grad():
        samples, lp_sample = flow().rsample_and_log_prob((5000,))
        over = torch.isinf(samples).any(-1)
        assert over.any() and (lp_sample[over] == -math.inf).all()
        lp = flow().log_prob(samples)
    assert (lp[over] == -math.inf).all() and not lp.isnan().any()


def test_logit_flow_samples_stay_in_the_unit_interval():
    """Logit's image is [logit(alpha), -logit(alpha)] for alpha > 0: a base sample past it
    gives x = 0 or 1, inside the support, which log_prob accepts (before, 26% of this wide
    flow's samples lay outside [0, 1] and log_prob refused them)."""
    torch.manual_seed(0)
    flow = Flow([Logit(1), MixtureCDFFlow(1, 3)], StandardNormal(1))
    with torch.no_grad():
        flow.transforms[1].log_scale.fill_(2.5)
        x = flow.sample(20000)
        assert ((x >= 0) & (x <= 1)).all()
        assert ((x == 0) | (x == 1)).float().mean() > 0.1  # the case arises
        assert torch.isfinite(flow.log_prob(x)).all()
    # Logit(alpha).inverse clamps; the density direction is unchanged.
    y = torch.tensor([[-20.0], [0.0], [20.0]])
    xs, _ = Logit(1).inverse(y)
    assert xs[:, 0].tolist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_sigmoid_onto_a_uniform_base_is_normalized_and_finite(kind):
    """Sigmoid's default alpha = 0 is the exact bijection of R onto (0, 1): a logit-output
    mixture then Sigmoid onto a Uniform base has a finite log-density at every finite x
    (float32: sigmoid(20) rounds to 1) and integrates to one; with Logit's alpha it is -inf
    where z leaves [0, 1] and still integrates to one (the map is one to one)."""
    torch.manual_seed(0)
    x = torch.linspace(-400, 400, 800001, dtype=torch.float64)[:, None]
    for alpha in (0.0, 1e-6):
        sigmoid = Sigmoid(1) if alpha == 0.0 else Sigmoid(1, alpha=alpha)  # the default: 0
        flow = Flow([MixtureCDFFlow(1, 4, kind=kind), sigmoid], Uniform(1))
        with torch.no_grad():
            far = flow.log_prob(torch.tensor([[20.0], [-20.0], [1e30]]))
            density = flow.double().log_prob(x).exp()
        assert torch.isfinite(far[:2]).all() == (alpha == 0.0)
        assert torch.trapezoid(density, x[:, 0]).item() == pytest.approx(1.0, abs=1e-4)


def test_a_diverged_network_is_an_error_not_minus_inf():
    flow = _steep_far_flow()
    with torch.no_grad():
        flow.transforms[0].made.layers[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weights are not finite"):
        flow.log_prob(torch.full((3, 2), 5.0))


def _wild(flow, scale=3.0):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("case", ["coupling", "iaf-density", "maf-sample"])
def test_overflowing_networks_give_minus_inf_on_every_route(case):
    """Finite networks whose outputs overflow for extreme values: the coupling layer and the
    one-pass solve (an IAF's density, a MAF's sampling, without gradients) mark those rows as
    the D-pass route does (value inf, log-density -inf), with validation on, instead of
    raising "not finite"; a diverged network is still an error."""
    torch.manual_seed(0)
    if case == "coupling":
        flow = _wild(fastflow.flows.Coupling(2, transforms=2, components=3,
                                             hidden_features=(8,)))
        x = torch.tensor([[3e38, 3e38], [0.1, 0.2]])
        lp = flow.log_prob(x)
        assert lp[0] == -math.inf and torch.isfinite(lp[1])
    elif case == "iaf-density":
        flow = fastflow.flows.IAF(2, transforms=2, components=3, hidden_features=(8,),
                                  kind="gaussian")
        x = torch.tensor([[-1e30, -1e30], [0.5, 0.5]])
        with torch.no_grad():
            lp = flow.log_prob(x)  # the one-pass route
        torch.testing.assert_close(lp, flow.log_prob(x).detach())  # the D-pass route
        assert lp[0] == -math.inf and torch.isfinite(lp[1])
    else:
        flow = _wild(fastflow.flows.MAF(3, transforms=2, components=3, hidden_features=(8,),
                                        kind="gaussian"))
        x = flow.sample(500)
        assert not x.isnan().any()
        lost = ~torch.isfinite(x).all(-1)
        assert lost.any()  # the case arises
        x, lp = flow.rsample_and_log_prob(500)
        assert not x.isnan().any() and not lp.isnan().any()
    network = next(m for m in flow.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        network.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weights are not finite"):
        with torch.no_grad():
            flow.log_prob(torch.full((3, flow.features), 1e30))


def test_float32_data_into_a_float64_flow_computes_in_float64():
    """It used to compute in float32 (1.3e-6 off); now it is exactly the float64 result."""
    flow = Flow([AutoregressiveMixtureFlow(2, 3, [16], seed=0), Reverse(2),
                 MixtureCDFFlow(2, 4)], MixtureOfGaussians(2, 3)).double()
    _perturb(flow)
    x = torch.randn(64, 2)
    lp = flow.log_prob(x)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, flow.log_prob(x.double()), rtol=1e-13, atol=1e-13)
    z, lad = flow(x)
    assert z.dtype == lad.dtype == torch.float64
    assert flow.dtype == torch.float64 and flow.device == torch.device("cpu")


def test_dequantized_log_prob_follows_the_flow_dtype():
    flow = Flow([Logit(3, alpha=1e-3), MixtureCDFFlow(3, 2)], StandardNormal(3)).double()
    x = torch.randint(0, 4, (16, 3))
    torch.manual_seed(0)
    lp = dequantized_log_prob(flow, UniformDequantization(3, 4), x)
    assert lp.dtype == torch.float64


def test_dequantization_takes_uint8_images_of_256_levels():
    """uint8 pixels against levels = 256: compared in uint8, 256 wrapped to 0 and every
    image was refused."""
    flow = Flow([Logit(2, alpha=1e-3), MixtureCDFFlow(2, 2)], StandardNormal(2))
    x = torch.tensor([[0, 255], [17, 128]], dtype=torch.uint8)
    assert torch.isfinite(dequantized_log_prob(flow, UniformDequantization(2, 256), x)).all()
    with pytest.raises(ValueError, match=r"x must lie in \[0, 3\]"):
        dequantized_log_prob(flow, UniformDequantization(2, 4), x)


@pytest.mark.parametrize("name", ["MAF", "IAF", "Coupling", "MixtureCDF"])
def test_flows_build_on_the_meta_device_and_load_their_weights(name):
    """Built under torch.device("meta") (no allocation), moved with to_empty and given a
    state dict, each one-line flow computes what the flow it was saved from does. Before,
    MAF and IAF read a value in their constructor and the permutations checked theirs on
    the meta device: both raised."""
    torch.manual_seed(0)
    sizes = {} if name == "MixtureCDF" else {"hidden_features": [8]}
    saved = getattr(fastflow.flows, name)(3, transforms=2, **sizes)
    with torch.device("meta"):
        flow = getattr(fastflow.flows, name)(3, transforms=2, **sizes)
    assert all(t.is_meta for t in (*flow.parameters(), *flow.buffers()))  # nothing allocated
    flow.to_empty(device="cpu").load_state_dict(saved.state_dict())
    x = torch.randn(5, 3)
    torch.testing.assert_close(flow().log_prob(x), saved().log_prob(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="meta device"):
        Permutation(torch.arange(3, device="meta"))


def test_small_inputs_name_the_problem():
    flow = Flow(MixtureCDFFlow(2, 3), StandardNormal(2))  # one transform, not in a list
    assert len(flow.transforms) == 1
    with pytest.raises(ValueError, match="x must be a torch.Tensor, got numpy.ndarray"):
        flow.log_prob(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        MixtureCDFFlow(2, 3)(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="x is on the meta device, which holds no values"):
        flow.log_prob(torch.zeros(3, 2, device="meta"))
    meta = fastflow.flows.MAF(2, transforms=1, hidden_features=[8]).to("meta")
    for call in (lambda: meta.log_prob(torch.zeros(3, 2)), lambda: meta.sample(3)):
        with pytest.raises(ValueError, match="the flow is on the meta device.*to_empty"):
            call()
    with pytest.raises(ValueError, match=r"transforms\[1\] must be a fastflow Transform"):
        Flow([MixtureCDFFlow(2, 3), torch.nn.Linear(2, 2)], StandardNormal(2))
    with pytest.raises(ValueError, match="transforms must be a Transform or a list"):
        Flow(3, StandardNormal(2))
    with pytest.raises(ValueError, match="base must have event shape"):
        Flow(MixtureCDFFlow(2, 3), Normal(torch.zeros(2), torch.ones(2)))
    for make in (lambda: Reverse(0), lambda: Logit(0), lambda: MixtureOfGaussians(2.5, 3),
                 lambda: StandardNormal(True)):
        with pytest.raises(ValueError, match="features must be an int >= 1"):
            make()
    with pytest.raises(ValueError, match="components must be an int >= 1"):
        MixtureOfGaussians(2, 0)


def test_sample_shapes_in_flow_and_distribution():
    flow = Flow([AutoregressiveMixtureFlow(3, 2, [8], seed=0)], StandardNormal(3))
    assert flow.sample((2, 3)).shape == (2, 3, 3)
    assert flow.sample(4).shape == (4, 3)
    assert flow.sample().shape == (3,)
    assert flow.rsample((2, 1)).shape == (2, 1, 3)
    x, lp = flow.rsample_and_log_prob((2, 5))
    assert x.shape == (2, 5, 3) and lp.shape == (2, 5)
    torch.testing.assert_close(lp, flow.log_prob(x), rtol=1e-4, atol=1e-4)
    assert flow.distribution().sample((2, 3)).shape == (2, 3, 3)
    cond = Flow([AutoregressiveMixtureFlow(3, 2, [8], context_features=2, seed=0)],
                StandardNormal(3))
    ctx = torch.randn(4, 2)
    assert cond.sample((2, 3), ctx).shape == (2, 3, 4, 3)
    assert cond.distribution(ctx).sample((5,)).shape == (5, 4, 3)
    with pytest.raises(ValueError, match="sample_shape must be a non-negative int"):
        flow.sample((2, -1))
    with pytest.raises(ValueError, match="sample_shape must be a non-negative int"):
        flow.sample(2.5)


def test_sampling_with_nan_weights_and_validation_off_gives_nan(backend):
    """With validation off nothing refuses NaN weights: the one-pass sampler's values they
    reach are NaN (the CPU path marks the whole call), never the plausible numbers the
    per-step solves stopped at (the CLI's sample wrote 1.7e38 everywhere)."""
    from conftest import DEVICE

    previous = fastflow.get_validate_args()
    fastflow.set_validate_args(False)
    try:
        for poison in ("output_bias", "hidden_weight"):
            flow = fastflow.flows.MAF(3, transforms=1, components=2, hidden_features=[8],
                                      seed=0).to(DEVICE)
            made = flow.transforms[0].made
            with torch.no_grad():
                if poison == "output_bias":
                    made.output.bias.fill_(math.nan)
                else:
                    made.layers[0].weight.fill_(math.nan)
                x = flow.sample((6,)).cpu()
            assert x.isnan().any(), poison
            if poison == "output_bias":
                assert x.isnan().all()
    finally:
        fastflow.set_validate_args(previous)
