"""fastflow.fit: it lowers a flow's NLL, splits and shuffles the rows as documented, stops
early and goes back to the best parameters, trains conditional flows, records its history, and
refuses bad arguments with a ValueError naming them. Small flows and a few dozen steps, so the
file runs in seconds."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import fastflow
from fastflow.data import two_moons
from fastflow.distributions import StandardNormal
from fastflow.fit import FitDivergedError, FitHistory
from fastflow.nn import AutoregressiveMixtureFlow, Flow

pytestmark = pytest.mark.usefixtures("one_thread")


def small_flow(context_features=None):
    return Flow([AutoregressiveMixtureFlow(2, 4, [16], context_features=context_features,
                                           seed=0)], StandardNormal(2))


def moons(n, seed=0):
    return two_moons(n, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def nll(flow, x, context=None):
    """Mean NLL in nats per dimension, the unit fit reports."""
    return (-flow.log_prob(x, context).mean() / x.shape[1]).item()


class Recorder(nn.Module):
    """A stand-in flow over one feature with one parameter w: log p(x) = -(x - w)^2 (not a
    normalized density; fit only needs log_prob and parameters). It records the rows it is
    given, in training and in evaluation mode, so the tests can see how fit uses the data."""

    features = 1

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen = {True: [], False: []}

    def log_prob(self, x):
        self.seen[self.training].append(x[:, 0].detach().clone())
        return -(x[:, 0] - self.w) ** 2


class Drift(nn.Module):
    """Training pulls w upwards for ever (log p = w in training mode); the validation loss,
    (w - 1)^2, is lowest at w = 1 and grows after: a model that overfits on cue."""

    features = 1

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def log_prob(self, x):
        if self.training:
            return self.w.expand(len(x))
        return -(self.w - 1.0).square().expand(len(x))


class NaNAfter(nn.Module):
    """Its log-density turns NaN from the given call on, as a diverging flow's does."""

    features = 2

    def __init__(self, after):
        super().__init__()
        self.w, self.calls, self.after = nn.Parameter(torch.zeros(())), 0, after

    def log_prob(self, x):
        self.calls += 1
        value = -(x - self.w).square().sum(-1)
        return value * math.nan if self.calls >= self.after else value


# ---------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------
def test_fit_lowers_the_nll_of_a_small_flow_on_two_moons():
    flow, x, test = small_flow(), moons(2000), moons(1000, seed=1)
    before = nll(flow, test)
    history = fastflow.fit(flow, x, steps=150, batch_size=128, lr=1e-2, seed=0,
                           progress=False)
    after = nll(flow, test)
    # measured: 1.26 nats/dim before, 0.49 after 150 steps
    assert after < before - 0.5, (before, after)
    assert np.mean(history.train_loss[-20:]) < np.mean(history.train_loss[:20]) - 0.2
    assert history.val_loss[-1] == pytest.approx(after, abs=0.1)  # held-out, same data
    assert flow.training  # the flow's mode is left as it was


def test_fit_is_exported_and_repeatable_with_a_seed():
    assert "fit" in fastflow.__all__ and fastflow.fit.__module__ == "fastflow.fit"
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)
        flow = small_flow()
        runs.append(fastflow.fit(flow, moons(200), steps=6, batch_size=32, seed=seed,
                                 progress=False).train_loss)
    assert runs[0] == runs[1] and runs[0] != runs[2]


# ---------------------------------------------------------------------------------------------
# data use and history
# ---------------------------------------------------------------------------------------------
def test_rows_are_split_once_and_shuffled_every_epoch():
    """Epochs of 150 training rows in batches of 32 (four full and one of 22), 50 rows held
    out and evaluated once per epoch and on nothing else."""
    flow = Recorder()
    x = torch.arange(200.0).unsqueeze(1)
    history = fastflow.fit(flow, x, epochs=3, batch_size=32, lr=1e-2, validation=0.25,
                           seed=0, progress=False)
    assert (history.n_train, history.n_val, history.steps, history.epochs) == (150, 50, 15, 3)
    train_batches, val_batches = flow.seen[True], flow.seen[False]
    assert [len(b) for b in train_batches] == [32, 32, 32, 32, 22] * 3
    epochs = [torch.cat(train_batches[i:i + 5]) for i in (0, 5, 10)]
    val_rows = torch.cat(val_batches[:1])
    assert all(len(b) == 50 for b in val_batches) and len(val_batches) == 3
    for rows in epochs:  # each training row exactly once per epoch
        assert torch.equal(rows.sort().values, epochs[0].sort().values)
    assert not torch.equal(epochs[0], epochs[1])  # in a new order
    assert set(epochs[0].tolist()).isdisjoint(val_rows.tolist())
    assert sorted(epochs[0].tolist() + val_rows.tolist()) == list(range(200))
    held_out = sorted(val_rows.tolist())
    assert held_out[-1] - held_out[0] > 100  # a random subset, not the first or last rows
    # the history: one train loss per step, one validation loss per epoch, in nats/dim
    assert len(history.train_loss) == 15 and history.val_step == [5, 10, 15]
    w = flow.w.item()
    assert history.val_loss[-1] == pytest.approx(((val_rows - w) ** 2).mean().item(),
                                                 rel=1e-5)
    assert history.best_val_loss == min(history.val_loss)
    assert history.best_step == history.val_step[history.val_loss.index(min(history.val_loss))]
    assert not history.stopped_early and not history.restored_best


def test_steps_and_eval_every():
    flow = Recorder()
    history = fastflow.fit(flow, torch.arange(40.0).unsqueeze(1), steps=12, batch_size=8,
                           eval_every=5, seed=1, progress=False)
    # 36 training rows: epochs of 5 batches (four of 8, one of 4), evaluated at 5, 10 and
    # the final step
    assert history.steps == 12 and history.epochs == 2 and len(history.train_loss) == 12
    assert history.val_step == [5, 10, 12] and len(history.val_loss) == 3
    assert [len(b) for b in flow.seen[True]] == [8, 8, 8, 8, 4] * 2 + [8, 8]


def test_no_validation():
    flow = Recorder()
    history = fastflow.fit(flow, torch.randn(30, 1), epochs=2, batch_size=64, validation=0,
                           progress=False)
    assert history == FitHistory(train_loss=history.train_loss, steps=2, epochs=2,
                                 n_train=30, n_val=0)
    assert flow.seen[False] == [] and [len(b) for b in flow.seen[True]] == [30, 30]


# ---------------------------------------------------------------------------------------------
# early stopping
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _val_loss(flow):
    flow.eval()
    value = -flow.log_prob(torch.zeros(1, 1)).item()
    flow.train()
    return value


def test_early_stopping_restores_the_best_state():
    flow = Drift()
    history = fastflow.fit(flow, torch.zeros(100, 1), epochs=100, batch_size=10, lr=0.05,
                           validation=0.1, patience=3, progress=False)
    assert history.stopped_early and history.restored_best
    assert history.epochs < 100 and history.steps == history.epochs * 9
    best = min(history.val_loss)
    assert history.best_val_loss == best and history.val_loss[-4] == best
    assert all(v > best for v in history.val_loss[-3:])  # three evaluations without gain
    # the flow is back at the best evaluation's parameters
    assert _val_loss(flow) == pytest.approx(best, abs=1e-7)
    assert 0.5 < flow.w.item() < 1.5


def test_without_patience_the_final_state_is_kept():
    flow = Drift()
    history = fastflow.fit(flow, torch.zeros(100, 1), epochs=40, batch_size=10, lr=0.05,
                           validation=0.1, progress=False)
    assert not history.stopped_early and not history.restored_best and history.epochs == 40
    assert history.val_loss[-1] > history.best_val_loss
    assert _val_loss(flow) == pytest.approx(history.val_loss[-1], rel=1e-6)


def test_divergence_is_a_clear_error():
    flow = NaNAfter(after=4)
    with pytest.raises(FitDivergedError, match=r"diverged at step 4: .*nan.*smaller lr"):
        fastflow.fit(flow, torch.randn(50, 2), steps=30, batch_size=10, lr=0.5,
                     validation=0, progress=False)
    assert flow.calls < 30  # it stopped


# ---------------------------------------------------------------------------------------------
# context, dtypes, devices, optimizers, progress
# ---------------------------------------------------------------------------------------------
def test_conditional_flow_learns_from_its_context():
    """Points around (1, 1) when the context is +1 and (-1, -1) when it is -1."""
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2, (600, 1), generator=g).float() * 2 - 1
    x = c * torch.ones(1, 2) + 0.2 * torch.randn(600, 2, generator=g)
    flow = small_flow(context_features=1)
    before = nll(flow, x, c)
    history = fastflow.fit(flow, x, context=c.numpy(), steps=120, batch_size=100, lr=1e-2,
                           seed=0, progress=False)
    # measured: 1.32 nats/dim before, -0.20 after; -0.16 on the validation rows
    assert nll(flow, x, c) < before - 1.0 and history.best_val_loss < 0.3
    # the context matters: the wrong one scores the same points much worse (13 nats/dim)
    assert nll(flow, x, -c) > nll(flow, x, c) + 5.0


def test_conditional_flow_without_its_context_is_refused():
    with pytest.raises(ValueError, match="context is required"):
        fastflow.fit(small_flow(context_features=1), moons(50), steps=2, progress=False)


def test_data_follow_the_flows_dtype():
    flow = small_flow().double()
    seen = []
    log_prob = flow.log_prob
    flow.log_prob = lambda x, *a: seen.append(x.dtype) or log_prob(x, *a)
    data = np.round(moons(100).numpy() * 10).astype(np.int64)  # integers from numpy
    history = fastflow.fit(flow, data, steps=3, batch_size=20, progress=False)
    assert set(seen) == {torch.float64} and all(map(math.isfinite, history.train_loss))
    with pytest.raises(ValueError, match="data must be finite.*float32"):
        fastflow.fit(small_flow(), np.full((10, 2), 1e300), steps=1, progress=False)


def test_device_argument_moves_the_flow():
    flow = small_flow()
    fastflow.fit(flow, moons(40), steps=1, device="cpu", progress=False)
    assert flow.device == torch.device("cpu")


def test_optimizer_instance_and_factory():
    flow = small_flow()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    fastflow.fit(flow, moons(64), steps=2, batch_size=32, optimizer=opt, progress=False)
    assert len(opt.state) > 0 and all(s["step"] == 2 for s in opt.state.values())
    made = []

    def factory(params, lr):
        made.append(torch.optim.SGD(params, lr=lr))
        return made[-1]

    before = [p.detach().clone() for p in flow.parameters()]
    fastflow.fit(flow, moons(64), steps=1, lr=0.25, optimizer=factory, progress=False)
    assert len(made) == 1 and made[0].param_groups[0]["lr"] == 0.25
    assert any(not torch.equal(a, b) for a, b in zip(before, flow.parameters(), strict=True))


def test_optimizers_that_need_a_closure_and_ones_that_take_none():
    """LBFGS evaluates the loss several times per step through a closure: fit gives it one
    and records the loss before each step; an optimizer whose step takes no closure gets the
    gradient computed beforehand. Before, LBFGS raised a TypeError."""
    torch.manual_seed(0)
    model = Recorder()
    x = torch.full((16, 1), 2.0)
    history = fastflow.fit(model, x, steps=3, batch_size=16, validation=0.0,
                           optimizer=lambda p, lr: torch.optim.LBFGS(p, lr=1.0, max_iter=5),
                           progress=False)
    assert history.train_loss[0] == pytest.approx(4.0)  # (2 - 0)^2, before the first step
    assert model.w.item() == pytest.approx(2.0, abs=1e-4)  # LBFGS solves the quadratic
    assert len(model.seen[True]) > 3  # more than one evaluation per step

    class PlainSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"])

    model = Recorder()
    history = fastflow.fit(model, x, steps=1, batch_size=16, validation=0.0, lr=0.25,
                           optimizer=PlainSGD, progress=False)
    assert model.w.item() == pytest.approx(1.0)  # 0 - 0.25 * d/dw (w - 2)^2 at w = 0
    assert history.train_loss == [pytest.approx(4.0)]
    # Optimizers whose closure is optional step plainly: a step pre-hook (where gradient
    # clipping goes) sees the batch's own gradient, -4 at w = 0.
    model, seen = Recorder(), []
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(model.w.grad.item()))
    fastflow.fit(model, x, steps=1, batch_size=16, validation=0.0, optimizer=opt,
                 progress=False)
    assert seen == [pytest.approx(-4.0)]


def test_progress_bar_only_on_request_when_stderr_is_not_a_terminal(capsys):
    for progress in (None, False):
        fastflow.fit(small_flow(), moons(64), steps=3, batch_size=32, progress=progress)
        assert capsys.readouterr().err == ""
    fastflow.fit(small_flow(), moons(64), steps=3, batch_size=32, progress=True)
    err = capsys.readouterr().err
    assert "fit" in err and "loss=" in err and "val=" in err


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------
BAD = [
    ({"data": torch.randn(20)}, r"data must be 2-D.*\(20,\)"),
    ({"data": torch.randn(4, 5, 2)}, "data must be 2-D"),
    ({"data": torch.randn(20, 3)}, "data has 3 features .* the flow has 2"),
    ({"data": torch.randn(20, 0)}, "data has 0 features"),
    ({"data": torch.tensor([[0.0, 1.0]] * 5 + [[math.nan, 0.0]])}, "data must be finite.*row 5"),
    ({"data": np.array([[0.0, 1.0]] * 5 + [[0.0, -math.inf]])}, "data must be finite"),
    ({"data": np.array([["a", "b"]] * 5)}, "data must hold real numbers.*<U1"),
    ({"data": np.array([[1, "x"]] * 5, dtype=object)}, "data must hold numbers"),
    ({"data": np.array([[1, None]] * 5, dtype=object)}, "data must be finite"),  # None: NaN
    ({"data": torch.ones(5, 2, dtype=torch.bool)}, "data must hold real numbers"),
    ({"data": torch.ones(5, 2, dtype=torch.complex64)}, "data must hold real numbers"),
    ({"data": [[1.0, 2.0], [3.0]]}, r"data must be an \(N, D\) array"),
    ({"data": torch.randn(1, 2), "validation": 0.5}, "1 row.*leaves none to train on"),
    ({"validation": -0.1}, r"validation must be a fraction in \[0, 1\), got -0.1"),
    ({"validation": 1.0}, "validation must be a fraction"),
    ({"validation": math.nan}, "validation must be a fraction"),
    ({"validation": "0.1"}, "validation must be a fraction"),
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"batch_size": 2.5}, "batch_size must be an int >= 1"),
    ({"batch_size": True}, "batch_size must be an int >= 1"),
    ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
    ({"lr": -1e-3}, "lr must be a positive number"),
    ({"lr": math.inf}, "lr must be a positive number"),
    ({"lr": "fast"}, "lr must be a positive number"),
    ({"context": torch.randn(19, 1)}, "context has 19 rows but data has 20"),
    ({"context": torch.randn(20)}, "context must be 2-D"),
    ({"context": torch.full((20, 1), math.nan)}, "context must be finite"),
    ({"steps": None}, "exactly one of epochs and steps, got neither"),
    ({"epochs": 2}, "exactly one of epochs and steps, got both"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"steps": None, "epochs": 1.5}, "epochs must be an int >= 1"),
    ({"patience": 2, "validation": 0}, "patience needs a validation set"),
    ({"patience": 0}, "patience must be an int >= 1"),
    ({"eval_every": 0}, "eval_every must be an int >= 1"),
    ({"optimizer": "adam"}, "optimizer must be a torch.optim.Optimizer or a callable"),
    ({"optimizer": lambda params, lr: None}, "must return a torch.optim.Optimizer"),
    ({"optimizer": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)},
     "optimizer updates none of the flow's parameters"),
    ({"optimizer": lambda params, lr: torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                                                      lr=lr)},
     r"optimizer\(params, lr=lr\) updates none of the flow's parameters"),
    ({"progress": "yes"}, "progress must be True, False or None"),
    ({"seed": "abc"}, "seed must be an int or None"),
    ({"device": "nonsense"}, "device must name a torch device"),
    ({"device": "meta"}, "device 'meta' holds no values"),
    ({"data": torch.zeros(0, 2)}, r"data has no rows \(shape \(0, 2\)\)"),
    *([({"device": "cuda"}, "device 'cuda' is not available here")]
      if not torch.cuda.is_available() else []),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[f"{i}-{next(iter(k))}"
                                                       for i, (k, _) in enumerate(BAD)])
def test_bad_arguments_are_value_errors_naming_them(kwargs, message):
    flow = small_flow(context_features=1 if "context" in kwargs else None)
    before = [p.detach().clone() for p in flow.parameters()]
    kwargs = {"steps": 2, "progress": False, **kwargs}
    data = kwargs.pop("data", moons(20))
    with pytest.raises(ValueError, match=message):
        fastflow.fit(flow, data, **kwargs)
    # refused before any training
    assert all(torch.equal(a, b) for a, b in zip(before, flow.parameters(), strict=True))


def test_a_flow_without_log_prob_is_refused():
    with pytest.raises(ValueError, match="flow must have log_prob and parameters"):
        fastflow.fit(nn.Linear(2, 2), moons(20), steps=1)


def test_data_outside_the_flows_support_is_refused_before_training():
    from fastflow.distributions import StandardNormal
    from fastflow.nn import Flow, Logit, MixtureCDFFlow

    flow = Flow([Logit(2), MixtureCDFFlow(2, 3)], StandardNormal(2))
    before = [p.detach().clone() for p in flow.parameters()]
    data = torch.rand(50, 2)
    data[17, 1] = 1.5
    with pytest.raises(ValueError, match="data row 17 lies outside the flow's support"):
        fastflow.fit(flow, data, steps=2, progress=False)
    assert all(torch.equal(p, b) for p, b in zip(flow.parameters(), before, strict=True))
    data[17, 1] = 0.5
    assert fastflow.fit(flow, data, steps=2, progress=False).steps == 2


def test_a_context_for_a_flow_without_one_is_refused():
    with pytest.raises(ValueError, match="no transform of this flow takes one"):
        fastflow.fit(fastflow.flows.MixtureCDF(2), moons(50), steps=1, progress=False,
                     context=torch.randn(50, 1))


def test_datasets_and_loaders_are_refused_with_the_way_out():
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(moons(20))
    for data in (dataset, DataLoader(dataset)):
        with pytest.raises(ValueError, match=r"got a (TensorDataset|DataLoader); fit shuffles"):
            fastflow.fit(small_flow(), data, steps=1, progress=False)

