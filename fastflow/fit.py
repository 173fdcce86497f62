"""``fastflow.fit``: maximum-likelihood training of a flow on an (N, D) data set.

One call does what every training script repeats: check the data, hold out a validation
fraction, draw mini-batches by shuffled epochs, step Adam (or a given optimizer), evaluate the
held-out NLL, stop early when it stops improving (and go back to the best parameters), show a
progress bar, and return the loss history. Losses are mean negative log-likelihoods in nats
per dimension, the unit ``fastflow train`` reports.
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checks
from .functional import get_validate_args, set_validate_args

__all__ = ["FitDivergedError", "FitHistory", "fit"]

# Losses stay on the device for this many steps before one host transfer records them: a
# per-step .item() would make a GPU wait for every step.
_RECORD_EVERY = 10


class FitDivergedError(RuntimeError):
    """The training loss became NaN or infinite: the step size is too large for this flow
    and data (or the data need rescaling)."""


@dataclass
class FitHistory:
    """What :func:`fit` did. Every loss is a mean negative log-likelihood in nats per
    dimension (divide by ln 2 for bits per dimension).

    Attributes:
        train_loss: one value per optimizer step: the loss of that step's mini-batch,
            computed before the step's update.
        val_loss: one value per evaluation: the loss over the whole validation set.
        val_step: the number of optimizer steps taken when each evaluation ran.
        best_val_loss: the lowest finite ``val_loss`` (None without validation).
        best_step: the ``val_step`` of ``best_val_loss`` (None without validation).
        stopped_early: whether ``patience`` ended training before the last epoch or step.
        restored_best: whether the flow was given back its best-validation parameters.
        steps: optimizer steps taken.
        epochs: complete passes over the training rows.
        n_train, n_val: rows used for training and held out for validation.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    best_val_loss: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    restored_best: bool = False
    steps: int = 0
    epochs: int = 0
    n_train: int = 0
    n_val: int = 0


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _flow_dtype_device(flow) -> tuple[torch.dtype, torch.device]:
    """The flow's floating dtype and device: its ``dtype``/``device`` properties where it has
    them (fastflow's Flow does), else those of its first floating parameter."""
    dtype, device = getattr(flow, "dtype", None), getattr(flow, "device", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and isinstance(
            device, torch.device):
        return dtype, device
    for p in flow.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


def _as_matrix(value, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` (a tensor, numpy array or nested list) as a finite 2-D tensor of ``dtype`` on
    ``device``; ValueError naming ``name`` otherwise. Integers are converted to floats; bools,
    complex numbers, strings and other objects are refused."""
    if isinstance(value, torch.utils.data.Dataset | torch.utils.data.DataLoader):
        raise ValueError(f"{name} must be an (N, D) tensor or array, got a "
                         f"{type(value).__name__}; fit shuffles and batches the rows itself "
                         f"(for a TensorDataset pass its tensors: dataset.tensors[0])")
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise ValueError(f"{name} must hold real numbers, got a tensor of {tensor.dtype}")
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as e:  # ragged nested lists
            raise ValueError(f"{name} must be an (N, D) array of numbers: {e}") from None
        if array.dtype.kind == "O":
            try:
                array = array.astype(np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must hold numbers, got an array of Python "
                                 "objects that are not all numbers") from None
        if array.dtype.kind not in "iuf":
            raise ValueError(f"{name} must hold real numbers, got an array of dtype "
                             f"{array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, (N, D) rows of features, got shape "
                         f"{tuple(tensor.shape)}")
    tensor = tensor.to(device=device, dtype=dtype)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        row = int((~finite).any(1).nonzero()[0, 0])
        raise ValueError(f"{name} must be finite (after conversion to {dtype}); row {row} holds "
                         f"{tensor[row].tolist()}")
    return tensor


def _check_support(flow, x: torch.Tensor) -> None:
    """ValueError where a row of the data lies outside the flow's support (its first
    transform's domain, e.g. [0, 1] for a flow that starts with Logit): training with
    validation off would report the -inf it gives as divergence."""
    distribution = getattr(flow, "distribution", None)
    if not callable(distribution):
        return
    try:
        support = distribution().support
    except (TypeError, ValueError, NotImplementedError):  # no support to check against
        return
    inside = support.check(x)
    if not bool(inside.all()):
        row = int((~inside).nonzero()[0, 0])
        raise ValueError(f"data row {row} lies outside the flow's support ({support}); "
                         f"transform the data into it, or start the flow with a transform "
                         f"from the data's range")


def _optimizer(optimizer, params, lr: float) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.Adam(params, lr=lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        return _check_steps_the_flow(optimizer, params, "optimizer")
    if callable(optimizer):
        made = optimizer(params, lr=lr)
        if not isinstance(made, torch.optim.Optimizer):
            raise ValueError(f"optimizer(params, lr=lr) must return a torch.optim.Optimizer, "
                             f"got {type(made).__name__}")
        return _check_steps_the_flow(made, params, "optimizer(params, lr=lr)")
    raise ValueError(f"optimizer must be a torch.optim.Optimizer or a callable such as "
                     f"torch.optim.SGD, got {type(optimizer).__name__}")


def _needs_closure(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt.step`` requires a closure (a ``closure`` parameter without a default, as
    LBFGS's, which evaluates the loss several times per step)."""
    try:
        param = inspect.signature(opt.step).parameters.get("closure")
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _step(opt: torch.optim.Optimizer, loss_fn, closure: bool) -> torch.Tensor:
    """One optimizer step on the loss ``loss_fn()`` gives; returns that loss, taken before
    the step (detached). With ``closure`` the step gets a closure that recomputes it;
    otherwise the gradient is computed first and ``step()`` called plainly, so that step
    pre-hooks (gradient clipping, say) see this batch's gradients."""
    losses = []

    def recompute():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        losses.append(loss.detach())
        return loss

    if closure:
        opt.step(recompute)
    else:
        recompute()
        opt.step()
    if not losses:
        raise ValueError(f"optimizer {type(opt).__name__} requires a closure but its step did "
                         "not call it")
    return losses[0]


def _check_steps_the_flow(optimizer, params, name: str) -> torch.optim.Optimizer:
    """ValueError unless the optimizer updates at least one of the flow's trainable
    parameters (one built on another model's would leave the flow as it is, silently)."""
    mine = {id(p) for p in params}
    if not any(id(p) in mine for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(f"{name} updates none of the flow's parameters: build it on "
                         f"flow.parameters()")
    return optimizer


def _snapshot(flow, params):
    """A copy of the flow's state (its state_dict where it has one, else its parameters)."""
    if hasattr(flow, "state_dict") and hasattr(flow, "load_state_dict"):
        return {k: v.detach().clone() for k, v in flow.state_dict().items()}
    return [p.detach().clone() for p in params]


def _restore(flow, params, state) -> None:
    if isinstance(state, dict):
        flow.load_state_dict(state)
        return
    with torch.no_grad():
        for p, saved in zip(params, state, strict=True):
            p.copy_(saved)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------
def fit(flow, data, *, epochs: int | None = None, steps: int | None = None,
        batch_size: int = 256, lr: float = 1e-3, validation: float = 0.1,
        patience: int | None = None, context=None, optimizer=None, progress: bool | None = None,
        seed: int | None = None, device=None, eval_every: int | None = None) -> FitHistory:
    """Fit ``flow`` to ``data`` by maximum likelihood; the flow is trained in place.

    Args:
        flow: a :class:`fastflow.nn.Flow`, or anything with ``log_prob(x)`` (and
            ``log_prob(x, context)`` when a context is given) and ``parameters()``.
        data: an (N, D) tensor, numpy array or nested list of real numbers, D the flow's
            ``features``. It is cast to the flow's floating dtype (``flow.dtype``) and moved,
            whole, to the training device; it is used as given (nothing is standardized).
        epochs, steps: how long to train; give exactly one. An epoch is one pass over the
            training rows in a fresh random order, in mini-batches of ``batch_size`` (the
            last one smaller when the rows do not divide evenly). With ``steps`` the epochs
            simply continue until that many optimizer steps are done.
        batch_size: rows per mini-batch (at most the number of training rows).
        lr: the learning rate of the default Adam, and the ``lr`` passed to an ``optimizer``
            factory.
        validation: the fraction of rows held out (a seeded random subset, at least one row
            when positive) to measure the NLL on unseen data; 0 holds out nothing.
        patience: stop after this many evaluations in a row without a lower validation loss,
            and, whenever patience is given, end with the flow's parameters from its best
            evaluation (needs ``validation > 0``). None trains to the end and keeps the final
            parameters.
        context: an optional (N, C) conditioning tensor or array, row i the context of data
            row i, for a conditional flow (split and shuffled with the data).
        optimizer: None for Adam; a ``torch.optim.Optimizer`` built on the flow's
            parameters (used as is, ``lr`` ignored); or a callable such as
            ``torch.optim.SGD`` or ``functools.partial(torch.optim.AdamW, weight_decay=0.01)``,
            called as ``optimizer(parameters, lr=lr)``. An optimizer whose step requires a
            closure (``torch.optim.LBFGS``) gets one that recomputes the mini-batch's loss.
        progress: show a tqdm bar with the running training loss (and the last validation
            loss) on stderr; None shows it only when stderr is a terminal.
        seed: seeds the validation split and the batch order; None draws the seed from
            torch's global generator (so ``torch.manual_seed`` makes a run repeatable).
        device: where to train (the flow is moved there); None keeps the flow's device.
        eval_every: evaluate every this many steps instead of at the end of each epoch. Either
            way the final parameters are evaluated too.

    Returns:
        a :class:`FitHistory`: per-step training losses, per-evaluation validation losses
        and the best of them, all in nats per dimension.

    Raises:
        ValueError: a bad argument; the message names it.
        FitDivergedError: the training loss became NaN or infinite (try a smaller ``lr``);
            the flow keeps the parameters it had then, which may hold NaN.
    """
    epochs = checks.check_optional_count("epochs", epochs)
    steps = checks.check_optional_count("steps", steps)
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps, got "
                         + ("both" if epochs is not None else "neither"))
    batch_size = checks.check_count("batch_size", batch_size)
    eval_every = checks.check_optional_count("eval_every", eval_every)
    patience = checks.check_optional_count("patience", patience)
    lr = checks.check_positive_real("lr", lr)
    if isinstance(validation, bool) or not isinstance(validation, numbers.Real) or not (
            0 <= validation < 1):
        raise ValueError(f"validation must be a fraction in [0, 1), got {validation!r}")
    if patience is not None and validation == 0:
        raise ValueError("patience needs a validation set: give validation > 0")
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"progress must be True, False or None, got {progress!r}")
    seed = checks.check_seed(seed)
    if not callable(getattr(flow, "log_prob", None)) or not callable(
            getattr(flow, "parameters", None)):
        raise ValueError(f"flow must have log_prob and parameters methods, got "
                         f"{type(flow).__name__} (a flow whose call gives its distribution, "
                         f"as zuko's do, needs a wrapper whose log_prob(x) is flow().log_prob(x))")

    dtype, flow_device = _flow_dtype_device(flow)
    if device is None:
        device = flow_device
    else:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must name a torch device, got {device!r}") from None
        if device.type == "meta":
            raise ValueError("device 'meta' holds no values to train on; use 'cpu' or 'cuda'")
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:  # e.g. a CPU-only torch given "cuda"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"device {str(device)!r} is not available here: {first}") from None
    x = _as_matrix(data, "data", dtype, device)
    n, features = x.shape
    if n == 0:
        raise ValueError(f"data has no rows (shape {tuple(x.shape)})")
    expected = getattr(flow, "features", None)
    if isinstance(expected, int) and features != expected:
        raise ValueError(f"data has {features} features (columns) but the flow has {expected}")
    if features == 0:
        raise ValueError("data has no features (shape (N, 0))")
    _check_support(flow, x)
    c = None
    if context is not None:
        c = _as_matrix(context, "context", dtype, device)
        if len(c) != n:
            raise ValueError(f"context has {len(c)} rows but data has {n}: row i of context "
                             "must belong to row i of data")
    n_val = 0 if validation == 0 else max(1, round(validation * n))
    if n - n_val < 1:
        raise ValueError(f"data has {n} row(s): validation={validation} leaves none to train "
                         "on")
    if device != flow_device and hasattr(flow, "to"):
        flow.to(device)  # after the checks, so that a refused call changes nothing
    params = [p for p in flow.parameters() if p.requires_grad]
    if not params:
        raise ValueError("flow has no parameters that require gradients")
    opt = _optimizer(optimizer, params, float(lr))
    closure = _needs_closure(opt)

    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g).to(device)
    val_idx, train_idx = order[:n_val], order[n_val:]
    n_train = len(train_idx)
    batch = min(batch_size, n_train)
    per_epoch = math.ceil(n_train / batch)
    total = steps if steps is not None else epochs * per_epoch
    history = FitHistory(n_train=n_train, n_val=n_val)

    def nll(rows):
        if c is None:
            log_p = flow.log_prob(x[rows])
        else:
            log_p = flow.log_prob(x[rows], c[rows])
        return -log_p.mean() / features

    @torch.no_grad()
    def evaluate() -> float:
        was_training = getattr(flow, "training", None)
        if was_training is not None:
            flow.eval()
        total_nll = 0.0
        try:
            for rows in val_idx.split(max(batch, 1024)):
                total_nll += nll(rows).item() * len(rows)
        finally:
            if was_training:
                flow.train()
        return total_nll / n_val

    from tqdm.auto import tqdm

    show = _stderr_is_terminal() if progress is None else progress
    bar = tqdm(total=total, desc="fit", unit="step", disable=not show, dynamic_ncols=True,
               file=sys.stderr)
    pending: list[torch.Tensor] = []
    running, postfix = None, {}
    best_state, since_best = None, 0

    def record() -> None:
        """Move the pending step losses to the history; stop on a non-finite one."""
        nonlocal running
        if not pending:
            return
        values = torch.stack(pending).tolist()
        pending.clear()
        for value in values:
            if not math.isfinite(value):
                step = len(history.train_loss) + 1
                raise FitDivergedError(
                    f"training diverged at step {step}: the loss is {value}; try a smaller lr "
                    f"(lr={lr:g}), or rescale the data")
            history.train_loss.append(value)
            running = value if running is None else 0.95 * running + 0.05 * value
        postfix["loss"] = f"{running:.4f}"
        bar.set_postfix(postfix, refresh=False)

    def validate() -> bool:
        """Evaluate, track the best state; True when patience has run out."""
        nonlocal best_state, since_best
        value = evaluate()
        history.val_loss.append(value)
        history.val_step.append(history.steps)
        postfix["val"] = f"{value:.4f}"
        bar.set_postfix(postfix, refresh=False)
        if math.isfinite(value) and (history.best_val_loss is None
                                     or value < history.best_val_loss):
            history.best_val_loss, history.best_step, since_best = value, history.steps, 0
            if patience is not None:
                best_state = _snapshot(flow, params)
        else:
            since_best += 1
        return patience is not None and since_best >= patience

    was_training = getattr(flow, "training", None)
    if was_training is not None:
        flow.train()
    validate_args = get_validate_args()
    set_validate_args(False)  # the data were checked above (finite, in the support)
    try:
        stop = False
        while not stop:
            batches = train_idx[torch.randperm(n_train, generator=g).to(device)].split(batch)
            for i, rows in enumerate(batches):
                pending.append(_step(opt, lambda rows=rows: nll(rows), closure))
                history.steps += 1
                bar.update(1)
                end_of_epoch = i == len(batches) - 1
                history.epochs += int(end_of_epoch)
                if len(pending) >= _RECORD_EVERY:
                    record()
                if history.steps >= total:
                    stop = True  # the final parameters are evaluated below
                    break
                due = end_of_epoch if eval_every is None else history.steps % eval_every == 0
                if due and n_val:
                    record()
                    if validate():
                        history.stopped_early = stop = True
                        break
        record()
        if n_val and (not history.val_step or history.val_step[-1] != history.steps):
            validate()
        if patience is not None and best_state is not None:
            _restore(flow, params, best_state)
            history.restored_best = True
    finally:
        set_validate_args(validate_args)
        bar.close()
        if was_training is not None:
            flow.train(was_training)
    return history
