"""The one-pass sequential solve (MAF sampling and inverse, IAF density of external data):
against the D-pass algorithm, the density direction it inverts, and the Triton kernel against
the reference."""

import pytest
import torch
from torch import nn

import fastflow
from fastflow.distributions import StandardNormal
from fastflow.nn import AutoregressiveMixtureFlow, Flow
from fastflow.reference.autoregressive import autoregressive_solve as reference_solve

from conftest import DEVICE, HAS_CUDA

VARIANTS = {
    "natural": dict(),
    "random-order": dict(order="random", hidden_degrees="random"),
    "residual": dict(order="random", residual=True),
    "context": dict(order="random", context_features=3),
}
# Used by KERNEL_CASES only (not crossed with the other tests' parameters).
KERNEL_VARIANTS = {**VARIANTS, "natural-context": dict(context_features=3)}


def _flow(D, K, hidden, variant, direction="maf", kind="logistic", output="logit",
          dtype=torch.float32, device="cpu", perturb=0.1):
    torch.manual_seed(D * 100 + K)
    t = AutoregressiveMixtureFlow(D, K, hidden, kind=kind, direction=direction, output=output,
                                  seed=7, **KERNEL_VARIANTS[variant])
    with torch.no_grad():  # move away from the near-uniform initialisation
        for p in t.parameters():
            p.add_(perturb * torch.randn_like(p))
    return t.to(dtype=dtype, device=device)


def _inputs(t, B, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(B, t.features, generator=gen, dtype=torch.float64)
    if t.output == "unit":
        v = torch.sigmoid(v)
    ctx = None
    if t.context_features is not None:
        ctx = torch.randn(B, t.context_features, generator=gen, dtype=torch.float64)
        ctx = ctx.to(dtype=dtype, device=device)
    return v.to(dtype=dtype, device=device), ctx


def _sequential_both_ways(t, v, ctx):
    """(one-pass, D-pass) results of the sequential direction of t on v."""
    run = t.inverse if t.direction == "maf" else t.forward
    with torch.no_grad():
        fast = run(v, ctx)
    slow = run(v, ctx)  # parameters require grad: the D-pass route, autograd-visible
    assert slow[0].requires_grad
    return fast, slow


@pytest.mark.parametrize("direction", ["maf", "iaf"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("D,K", [(1, 1), (2, 10), (13, 3), (64, 1), (64, 10)])
def test_one_pass_equals_d_pass(monkeypatch, D, K, variant, direction):
    """The reference path: equal to the straightforward algorithm within the round-trip
    tolerance of the float32 op (D = 13: a last block of GEMM steps cut short)."""
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    t = _flow(D, K, [48, 48], variant, direction)
    v, ctx = _inputs(t, 16)
    (fast, fast_lad), (slow, slow_lad) = _sequential_both_ways(t, v, ctx)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_lad, slow_lad.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("invert", [True, False], ids=["inverse", "forward"])
def test_reference_solve_logabsdet_per_dimension_equals_d_pass(monkeypatch, invert):
    """The reference solve's per-dimension (B, D) result and logabsdet, column by column,
    against D passes of per-dimension fastflow.mixture_cdf_inverse / mixture_cdf calls on the
    network's parameters for that column. A random order makes the solve's step t differ from
    the column it writes (the flows sum logabsdet over columns, which hides a permutation)."""
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    K = 3
    t = _flow(5, K, [24, 24], "context", kind="gaussian", output="logit", dtype=torch.float64)
    v, ctx = _inputs(t, 16, dtype=torch.float64)
    op = fastflow.mixture_cdf_inverse if invert else fastflow.mixture_cdf
    with torch.no_grad():
        plan = t.made.sequential_plan(ctx)
        order = plan["order"].tolist()
        assert order != sorted(order)
        got, got_lad = reference_solve(v, plan["weights"], plan["biases"], plan["table"],
                                       plan["order"], plan["out_weight"], plan["out_bias"], K,
                                       "gaussian", "logit", invert, False, "relu")
        r = torch.zeros_like(v)
        lad = torch.full_like(v, float("nan"))
        for col in order:  # one full network pass per dimension, in the flow's order
            logits, loc, log_scale = t.made(r, ctx)[:, col].split(K, dim=-1)
            r[:, col], lad[:, col] = op(v[:, col], logits, loc, log_scale, kind="gaussian",
                                        output="logit")
    assert torch.isfinite(lad).all()
    torch.testing.assert_close(got, r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_lad, lad, rtol=1e-9, atol=1e-9)


def test_one_pass_equals_d_pass_at_d784(monkeypatch):
    """MNIST-sized D on the reference path (float64: the comparison is then near-exact)."""
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    t = _flow(784, 2, [256], "random-order", dtype=torch.float64, perturb=0.0)
    z, _ = _inputs(t, 2, dtype=torch.float64)
    (fast, fast_lad), (slow, slow_lad) = _sequential_both_ways(t, z, None)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fast_lad, slow_lad.detach(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant,kind,output", [
    *[(v, "logistic", "unit") for v in VARIANTS], ("natural", "gaussian", "logit"),
    ("context", "logistic", "logit"),
])
def test_one_pass_is_inverted_by_the_density_direction(backend, variant, kind, output):
    """Independent of the solver: the one-pass MAF sample x maps back to z through the
    density direction (one network pass and the forward op), logabsdets negated."""
    t = _flow(5, 3, [24, 24], variant, kind=kind, output=output, dtype=torch.float64,
              device=DEVICE)
    z, ctx = _inputs(t, 20, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        x, lad_inv = t.inverse(z, ctx)
        z_back, lad = t(x, ctx)
    torch.testing.assert_close(z_back, z, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(lad_inv, -lad, rtol=1e-8, atol=1e-8)


KERNEL_CASES = [
    # D, K, hidden, variant, invert, kind, output, dtype
    (1, 3, [16], "natural", True, "logistic", "logit", torch.float64),
    (2, 1, [8, 8], "natural", False, "logistic", "unit", torch.float64),
    (3, 3, [20, 12], "random-order", True, "gaussian", "unit", torch.float64),
    (5, 2, [16, 16], "residual", True, "logistic", "logit", torch.float32),
    (4, 3, [40], "context", True, "logistic", "unit", torch.float32),
    (4, 3, [40], "context", False, "gaussian", "logit", torch.float64),
    (5, 1, [36, 36, 20], "random-order", False, "logistic", "logit", torch.float32),
    # D = 2: all 64 units of a layer have degree 1, several BLOCK_N tiles of them
    (2, 3, [64, 64], "natural", True, "logistic", "logit", torch.float64),
    (2, 2, [64, 64], "natural-context", False, "gaussian", "unit", torch.float64),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_kernel_matches_reference(case):
    """The one-launch kernel (interpreted on a CPU) against the reference, on the same plan.
    The [64, 64] cases put more units of one degree (D = 2: all have degree 1) in a layer
    than one tile of LAUNCH's block_n holds: each tile past the first must start at its own
    offset."""
    from fastflow.kernels.autoregressive import LAUNCH
    from fastflow.kernels.autoregressive import autoregressive_solve as kernel_solve

    D, K, hidden, variant, invert, kind, output, dtype = case
    t = _flow(D, K, hidden, variant, kind=kind, output=output, dtype=dtype, device=DEVICE)
    v, ctx = _inputs(t, 37, dtype=dtype, device=DEVICE)  # two row tiles, one partial
    with torch.no_grad():
        plan = t.made.sequential_plan(ctx)
        args = (v, plan["weights"], plan["biases"], plan["table"], plan["order"],
                plan["out_weight"], plan["out_bias"], K, kind, output, invert,
                t.made.residual, "relu")
        got, want = kernel_solve(*args), reference_solve(*args)
    if hidden == [64, 64]:  # those cases' point: one degree's units span several tiles
        assert (plan["table"][1:].diff(dim=1) > LAUNCH["block_n"]).any()
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)


@pytest.mark.skipif(not HAS_CUDA, reason="the compiled kernel at D = 784 needs a GPU; on a "
                    "CPU the interpreter would take hours (small D is tested above)")
@pytest.mark.parametrize("invert", [True, False])
def test_kernel_matches_reference_at_d784_on_gpu(invert):
    """W5's dimension and MADE width on the compiled kernel, against the reference on the
    same GPU tensors (float64, so the comparison is tight)."""
    from fastflow.kernels.autoregressive import autoregressive_solve as kernel_solve

    t = _flow(784, 10, [1024, 1024], "random-order", dtype=torch.float64, device=DEVICE,
              perturb=0.0)
    v, _ = _inputs(t, 64, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        plan = t.made.sequential_plan(None)
        args = (v, plan["weights"], plan["biases"], plan["table"], plan["order"],
                plan["out_weight"], plan["out_bias"], 10, "logistic", "logit", invert, False,
                "relu")
        got, want = kernel_solve(*args), reference_solve(*args)
    torch.testing.assert_close(got[0], want[0], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got[1], want[1], rtol=1e-8, atol=1e-8)


def test_sampling_takes_the_one_pass_route(monkeypatch):
    """Flow.sample never runs a full network pass; rsample (gradients) takes the D-pass route
    and gives the same samples."""
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    t = _flow(5, 3, [16], "natural", dtype=torch.float64)
    flow = Flow([t], StandardNormal(5)).double()
    calls = []
    step = t._mixture_step
    monkeypatch.setattr(t, "_mixture_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    torch.manual_seed(0)
    x = flow.sample(8)
    assert not calls and not x.requires_grad
    torch.manual_seed(0)
    x_r = flow.rsample(8)
    assert len(calls) == 5 + 1 and x_r.requires_grad
    torch.testing.assert_close(x, x_r.detach(), rtol=1e-10, atol=1e-10)
    t.one_pass = False  # forces the D passes without gradients too
    torch.manual_seed(0)
    x_d = flow.sample(8)
    assert len(calls) == 2 * (5 + 1)
    torch.testing.assert_close(x, x_d, rtol=1e-10, atol=1e-10)


def test_non_relu_activation_uses_the_reference_solver(backend):
    """A MADE with another activation is solved in one pass by the reference on every
    backend (the kernel fuses ReLU only)."""
    t = _flow(4, 2, [16], "natural", dtype=torch.float64, device=DEVICE)
    t.made.activation = nn.Tanh()
    z, _ = _inputs(t, 6, dtype=torch.float64, device=DEVICE)
    (fast, fast_lad), (slow, slow_lad) = _sequential_both_ways(t, z, None)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fast_lad, slow_lad.detach(), rtol=1e-9, atol=1e-9)


def test_opcheck_autoregressive_solve():
    t = _flow(3, 2, [8], "context", dtype=torch.float64)
    v, ctx = _inputs(t, 4, dtype=torch.float64)
    with torch.no_grad():
        plan = t.made.sequential_plan(ctx)
    args = (v, plan["weights"], plan["biases"], plan["table"], plan["order"],
            plan["out_weight"], plan["out_bias"], 2, "logistic", "logit", True, False, "relu")
    torch.library.opcheck(torch.ops.fastflow.autoregressive_solve, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_one_pass_route_reports_bad_input_and_a_diverged_network():
    t = _flow(3, 2, [8], "natural", output="unit", dtype=torch.float64)
    z, _ = _inputs(t, 4, dtype=torch.float64)
    with torch.no_grad():
        with pytest.raises(ValueError, match="z must lie in"):
            t.inverse(z + 1.0)
        with pytest.raises(ValueError, match="z must lie in"):
            t.inverse(torch.full_like(z, float("nan")))
        t.made.output.bias[4] = float("inf")  # a log_scale of the first dimension
        with pytest.raises(ValueError, match="weights are not finite"):
            t.inverse(z)
