"""The op layer's two routes to an op's body: direct in plain eager mode, through the
dispatcher (torch.ops.fastflow) wherever something else must see the op."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow
from fastflow.ops import core
from fastflow.reference import naive

from helpers import random_mixture


class _Recorder(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher's Python modes."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """Counts the direct calls of each op body."""
    counts = {}

    def wrap(name, body):
        def counting(*args):
            counts[name] = counts.get(name, 0) + 1
            return body(*args)
        return counting

    for name, body in list(core.BODIES.items()):
        monkeypatch.setitem(core.BODIES, name, wrap(name, body))
    return counts


def _forward_backward(x, params, op):
    out = op(x, *params)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o * (i + 1)).sum() for i, o in enumerate(out))
    return [o.detach() for o in out], torch.autograd.grad(loss, (x, *params))


OPS = {
    "mixture_cdf": (lambda x, *p: fastflow.mixture_cdf(x, *p, output="logit",
                                                        validate_args=False),
                    "mixture_cdf_fwd", "mixture_cdf_bwd"),
    "mixture_log_prob": (lambda x, *p: fastflow.mixture_log_prob(x, *p, validate_args=False),
                         "mixture_log_prob_fwd", "mixture_log_prob_bwd"),
    "mixture_cdf_inverse": (lambda y, *p: fastflow.mixture_cdf_inverse(
        y, *p, output="logit", validate_args=False),
        "mixture_cdf_inverse_fwd", "mixture_cdf_inverse_bwd"),
}


def _inputs(requires_grad=True):
    params = [p.requires_grad_(requires_grad) for p in random_mixture((3, 5), 4)]
    x = torch.randn(3, 5).requires_grad_(requires_grad)
    return x, params


@pytest.mark.parametrize("name", list(OPS))
def test_eager_calls_take_the_body_and_match_the_dispatcher(name, counted, backend):
    op, fwd, bwd = OPS[name]
    x, params = _inputs()
    out, grads = _forward_backward(x, params, op)
    assert counted == {fwd: 1, bwd: 1}
    counted.clear()
    with _Recorder() as rec:
        out_d, grads_d = _forward_backward(x, params, op)
    assert counted == {}
    assert f"fastflow.{fwd}.default" in rec.names and f"fastflow.{bwd}.default" in rec.names
    for a, b in zip([*out, *grads], [*out_d, *grads_d], strict=True):
        assert torch.equal(a, b)


def test_intercepting_contexts_take_the_dispatcher(counted):
    op = OPS["mixture_cdf"][0]
    x, params = _inputs(requires_grad=False)
    with torch.profiler.profile() as prof:
        op(x, *params)
    assert counted == {}
    assert any(e.name == "fastflow::mixture_cdf_fwd" for e in prof.events())
    with torch.device("cpu"):  # a torch-function mode
        op(x, *params)
    assert counted == {}
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        y, lad = op(mode.from_tensor(x), *(mode.from_tensor(p) for p in params))
    assert counted == {} and y.shape == x.shape and lad.shape == x.shape
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        op(x, *params)
    assert counted == {}
    op(x, *params)
    assert counted == {"mixture_cdf_fwd": 1}


def test_double_backward_recomputes_differentiably(counted):
    """With create_graph the backward is recomputed by autograd through the log-space
    formulas (never a direct body whose gradients would lack a graph): the second derivative
    is autograd's through the reference forward."""

    x, params = _inputs()
    x = x.double().detach().requires_grad_()
    params = [p.double().detach().requires_grad_() for p in params]
    _, lad = OPS["mixture_cdf"][0](x, *params)
    g = torch.autograd.grad(lad.sum(), x, create_graph=True)[0]
    assert "mixture_cdf_bwd" not in counted
    gg = torch.autograd.grad(g.sum(), x)[0]
    xr = x.detach().clone().requires_grad_()
    full = [p.detach().expand(*x.shape, p.shape[-1]) for p in params]
    _, lad_r = naive.forward(xr, *full, "logistic", "logit")
    g_r = torch.autograd.grad(lad_r.sum(), xr, create_graph=True)[0]
    torch.testing.assert_close(gg, torch.autograd.grad(g_r.sum(), xr)[0])


def test_tensor_subclasses_and_lists_are_checked():
    t = torch.zeros(2)
    plain = torch.nn.Parameter(torch.zeros(2))
    with torch.no_grad():
        assert core._plain_eager((t, [t, plain], 3, "logit"))

        class Sub(torch.Tensor):
            pass

        sub = t.as_subclass(Sub)
        assert not core._plain_eager((t, sub))
        assert not core._plain_eager((t, [t, sub]))
        assert not core._plain_eager((t, torch.zeros(2, device="meta")))
    assert not core._plain_eager((t,))  # grad mode on


def test_every_route_decision_is_the_dispatch_modules(monkeypatch):
    """The decisions the flows and the functional layer act on come from ops.dispatch: a
    masked product outside MADE takes the kernel exactly on the Triton backend, the fused head
    never takes a context (its kernel has none), and the one-pass solve's kernel runs only a
    ReLU MADE."""
    from fastflow.ops import dispatch

    x = torch.zeros(2, 3)
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    assert dispatch.route(x, None) == "dense"
    assert not dispatch.solve_kernel(x, "relu")
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.route(x, None) == "kernel"
    assert dispatch.head_fused(x, lambda: False)
    assert not dispatch.head_fused(x, lambda: False, context=torch.zeros(2, 1))
    assert dispatch.solve_kernel(x, "relu")
    assert not dispatch.solve_kernel(x, torch.tanh)
