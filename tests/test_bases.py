"""The base densities of fastflow.distributions: reparameterized sampling of the learnable
MixtureOfGaussians (gradients reach every parameter and match finite differences and the
mixture's closed-form moments; the draws follow the mixture), and the interface all bases
share (shapes, dtype, no graph from ``sample``, ``has_rsample``, ``support``, repr)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import constraints

from fastflow.distributions import MixtureOfGaussians, StandardNormal, Uniform

D, K = 2, 3
# Unequal weights, locations and scales, so that no gradient entry vanishes by symmetry.
LOGITS = [[0.3, -0.5, 0.8], [1.0, 0.0, -1.0]]
LOC = [[-1.5, 0.2, 2.0], [-0.5, 1.0, 3.0]]
LOG_SCALE = [[-0.3, 0.4, 0.1], [0.2, -0.6, 0.0]]
PARAMS = ("logits", "loc", "log_scale")


pytestmark = pytest.mark.usefixtures("one_thread")


def _mog(dtype=torch.float32):
    base = MixtureOfGaussians(D, K).to(dtype)
    with torch.no_grad():
        base.logits.copy_(torch.tensor(LOGITS))
        base.loc.copy_(torch.tensor(LOC))
        base.log_scale.copy_(torch.tensor(LOG_SCALE))
    return base


def _grads(base):
    return {name: getattr(base, name).grad for name in PARAMS}


def test_rsample_gives_finite_gradients_to_every_parameter(backend):
    """The reported failure: a squared-sample loss left loc.grad None. Every parameter now
    gets a finite gradient with no entry zero (each entry moves the draws)."""
    base = _mog()
    z = base.rsample(64)
    assert z.shape == (64, D) and z.requires_grad
    z.pow(2).sum().backward()
    for name, g in _grads(base).items():
        assert g is not None, f"{name}.grad is None"
        assert g.shape == (D, K)
        assert torch.isfinite(g).all(), f"{name}.grad {g}"
        assert (g != 0).all(), f"{name}.grad has zero entries: {g}"


def _sin_average(base, n):
    """The Monte-Carlo average of g(z) = sin(z) + z^2 / 4 over n draws from one fixed seed
    (common random numbers: the same logistic draws t at every parameter value)."""
    torch.manual_seed(7)
    z = base.rsample(n)
    return (torch.sin(z) + 0.25 * z * z).mean()


def test_rsample_gradients_match_finite_differences(backend):
    """The autograd gradient of the common-random-number average of g(z) equals its central
    finite difference in float64: every entry of all three parameters on the reference; on
    the interpreted kernels (about 0.4 s a draw whatever its size) one entry per parameter,
    the rest being covered by the kernels' gradient equalling the reference's below."""
    n = 2000
    base = _mog(torch.float64)
    _sin_average(base, n).backward()
    h = 1e-5
    for j, (name, g) in enumerate(_grads(base).items()):
        p = getattr(base, name)
        entries = ([(i, k) for i in range(D) for k in range(K)] if backend == "reference"
                   else [(j % D, j % K)])
        for i, k in entries:
            with torch.no_grad():
                p[i, k] += h
                up = _sin_average(base, n)
                p[i, k] -= 2 * h
                down = _sin_average(base, n)
                p[i, k] += h
            fd = (up - down) / (2 * h)
            torch.testing.assert_close(g[i, k], fd, rtol=1e-6, atol=1e-8,
                                       msg=lambda m, e=(name, i, k): f"{e}: {m}")


def test_kernel_rsample_gradients_equal_the_reference(monkeypatch):
    """On the same draws the interpreted kernels give the reference's samples and gradients,
    entry for entry."""
    out = {}
    for which in ("reference", "triton"):
        monkeypatch.setenv("FASTFLOW_BACKEND", which)
        base = _mog(torch.float64)
        torch.manual_seed(7)
        z = base.rsample(500)
        (torch.sin(z) + 0.25 * z * z).mean().backward()
        out[which] = (z.detach(), *_grads(base).values())
    for ref, ker in zip(out["reference"], out["triton"], strict=True):
        torch.testing.assert_close(ker, ref, rtol=1e-9, atol=1e-12)


def _moment_gradient_estimates(base, power, batches=20, per_batch=10_000):
    """Autograd gradients of mean(z^power) over ``batches`` independent rsample draws of
    ``per_batch``: their mean estimates d E[z^power] / d theta and their spread gives its
    standard error."""
    params = [getattr(base, name) for name in PARAMS]
    rows = [torch.autograd.grad(base.rsample(per_batch).pow(power).mean(0).sum(), params)
            for _ in range(batches)]
    out = {}
    for j, name in enumerate(PARAMS):
        g = torch.stack([r[j] for r in rows])  # (batches, D, K)
        out[name] = g.mean(0), g.std(0) / math.sqrt(batches)
    return out


@pytest.mark.parametrize("power", [1, 2])
def test_rsample_gradients_match_closed_form_moments(power):
    """Independently of finite differences: E[z] = sum_k pi_k mu_k and
    E[z^2] = sum_k pi_k (mu_k^2 + s_k^2) per dimension, so with m_k the component's own moment
    (mu_k, or mu_k^2 + s_k^2) and M = sum_k pi_k m_k,
    d M / d logits_k = pi_k (m_k - M), d M / d mu_k = pi_k d m_k / d mu_k and
    d M / d log_scale_k = pi_k d m_k / d log_scale_k (0, or 2 s_k^2).
    200k float64 draws estimate these within 4.5 standard errors; the errors are small enough
    that a missing or wrongly-signed gradient would be seen."""
    base = _mog(torch.float64)
    torch.manual_seed(3)
    est = _moment_gradient_estimates(base, power)
    with torch.no_grad():
        pi = torch.softmax(base.logits, -1)
        mu, s2 = base.loc, torch.exp(2 * base.log_scale)
        if power == 1:
            m, dm_dmu, dm_dls = mu, torch.ones_like(mu), torch.zeros_like(mu)
        else:
            m, dm_dmu, dm_dls = mu * mu + s2, 2 * mu, 2 * s2
        M = (pi * m).sum(-1, keepdim=True)
        exact = {"logits": pi * (m - M), "loc": pi * dm_dmu, "log_scale": pi * dm_dls}
    for name in PARAMS:
        mean, se = est[name]
        # a zero gradient sits exactly; the pathwise estimate of it is zero up to rounding
        tol = 4.5 * se + 1e-9
        assert ((mean - exact[name]).abs() <= tol).all(), (
            f"{name}: estimate {mean.tolist()} vs exact {exact[name].tolist()} "
            f"(standard errors {se.tolist()})")
        nonzero = exact[name].abs() > 0
        assert (se[nonzero] < 0.1 * exact[name].abs()[nonzero]).all(), f"{name}: too noisy"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rsample_follows_the_mixture(backend, dtype):
    """Each dimension's draws pass a Kolmogorov-Smirnov test against the mixture CDF
    sum_k pi_k Phi((x - mu_k) / s_k) computed by scipy (independently of fastflow), and the
    same test rejects the draws against the mixture with its weights reversed."""
    n = 20_000 if backend == "reference" else 4_000
    base = _mog(dtype)
    torch.manual_seed(11)
    z = base.rsample(n).detach().double().numpy()
    pi = torch.softmax(torch.tensor(LOGITS, dtype=torch.float64), -1).numpy()
    loc, scale = np.array(LOC), np.exp(np.array(LOG_SCALE))

    def cdf(d, weights):
        return lambda x: (weights * stats.norm.cdf((x[:, None] - loc[d]) / scale[d])).sum(-1)

    for d in range(D):
        assert stats.kstest(z[:, d], cdf(d, pi[d])).pvalue > 1e-3
        assert stats.kstest(z[:, d], cdf(d, pi[d][::-1])).pvalue < 1e-6  # the test has power


def test_rsample_handles_the_extreme_uniform_draws(backend, monkeypatch):
    """u = 0 (which torch.rand can return) and the uniform draws nearest 0 and 1 give finite
    samples and gradients: u = 0 is kept off the endpoint, and drawing in logit space keeps
    u near 1 from rounding to an infinite sample."""
    eps = 2.0 ** -24  # torch.rand's float32 resolution
    extremes = torch.tensor([0.0, eps, 0.5, 1 - eps])
    monkeypatch.setattr(  # row r of the draws is all extremes[r]
        torch, "rand", lambda shape, **kw: extremes.to(**kw).unsqueeze(-1).expand(shape).clone())
    base = _mog()
    z = base.rsample(4)
    assert torch.isfinite(z).all(), z
    assert (z[1] < z[2]).all() and (z[2] < z[3]).all() and (z[0] <= z[1]).all()
    z.sum().backward()
    for name, g in _grads(base).items():
        assert torch.isfinite(g).all(), f"{name}.grad {g}"


def test_rsample_rejects_non_finite_parameters():
    base = _mog()
    with torch.no_grad():
        base.loc[1, 2] = math.nan
    with pytest.raises(ValueError, match="loc"):
        base.rsample(3)


def test_mixture_sample_is_rsample_without_a_graph():
    base = _mog()
    torch.manual_seed(5)
    with_graph = base.rsample((3, 4))
    torch.manual_seed(5)
    without = base.sample((3, 4))
    assert not without.requires_grad and without.grad_fn is None
    torch.testing.assert_close(without, with_graph.detach(), rtol=0, atol=0)


BASES = {"uniform": lambda: Uniform(D), "normal": lambda: StandardNormal(D),
         "mog": lambda: MixtureOfGaussians(D, K)}
SUPPORTS = {"uniform": constraints.unit_interval, "normal": constraints.real,
            "mog": constraints.real}


@pytest.mark.parametrize("kind", list(BASES))
def test_shapes_dtypes_and_no_graph_from_sample(kind):
    base = BASES[kind]()
    for draw in (base.sample, base.rsample):
        empty = draw(0)
        assert empty.shape == (0, D) and empty.dtype == torch.float32
        assert draw((0, 2)).shape == (0, 2, D)
        assert draw((2, 3)).shape == (2, 3, D)
        assert draw(torch.tensor(4)).shape == (4, D)
        with pytest.raises(ValueError, match="non-negative"):
            draw((2, -1))
    s = base.sample((2, 3))
    assert not s.requires_grad and s.grad_fn is None
    assert base.rsample(5).requires_grad == (kind == "mog")
    double = base.double()
    assert double.sample(3).dtype == torch.float64
    assert double.rsample(3).dtype == torch.float64
    assert double.sample(0).dtype == torch.float64


@pytest.mark.parametrize("kind", list(BASES))
def test_interface_rsample_support_and_repr(kind):
    base = BASES[kind]()
    assert type(base).has_rsample is True
    assert base.support is SUPPORTS[kind]
    assert base.support.check(base.sample(1000)).all()
    expected = f"features={D}, components={K}" if kind == "mog" else f"features={D}"
    assert base.extra_repr() == expected
    assert f"({expected})" in repr(base)


@pytest.mark.parametrize("kind", list(BASES))
def test_log_prob_refuses_values_of_another_size_or_dtype(kind):
    """A base scores values of its own D only: StandardNormal(3) given 2 features returned the
    3-D constant on 2-D data, and Uniform 0, without a word."""
    base = BASES[kind]()
    assert base.log_prob(base.sample((2, 3))).shape == (2, 3)
    for bad in (torch.zeros(4, D - 1), torch.zeros(4, D + 1), torch.zeros(())):
        with pytest.raises(ValueError, match=rf"z must have {D} features"):
            base.log_prob(bad)
    with pytest.raises(ValueError, match="z must be a floating-point tensor"):
        base.log_prob(torch.zeros(4, D, dtype=torch.long))
