"""The demo behind ``fastflow train`` and ``fastflow sample``.

Data sets (generated 2-D shapes, scikit-learn's 8x8 digits, or an (N, D) array from a .npy,
.csv or .pt file), the model built from a plain config dict (so a checkpoint can rebuild it),
the training loop (one process, or one of several under ``torchrun`` with
DistributedDataParallel), evaluation in nats and bits per dimension, checkpoints and the
pictures. matplotlib and scikit-learn are optional and imported only when needed.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import fastflow

from ..data import rings, smiley, two_moons
from ..distributions import StandardNormal
from ..nn import (
    AutoregressiveMixtureFlow,
    Flow,
    Logit,
    Reverse,
    UniformDequantization,
    VariationalDequantization,
)

DATASETS_2D = {"two_moons": two_moons, "rings": rings, "smiley": smiley}
DATASETS = (*DATASETS_2D, "digits")
DATA_SUFFIXES = (".npy", ".csv", ".pt")
MIN_ROWS = 10  # a data file needs enough rows for both a training and a test split
TEST_FRACTION = 0.2  # of a data file's rows, held out (seeded) as the test set
CHECKPOINT_FORMAT = "fastflow-demo-1"
DIGIT_LEVELS = 17  # load_digits pixels take the values 0..16

# Per data set defaults; the command line overrides any of them. The models are small, so one
# CPU thread per process: more threads contend with other work for little gain (--threads
# overrides it).
DEFAULTS = {
    "2d": {"steps": 2000, "batch_size": 512, "lr": 5e-3, "hidden": (128, 128),
           "components": 8, "layers": 2, "threads": 1},
    "digits": {"steps": 1500, "batch_size": 128, "lr": 2e-3, "hidden": (512, 512),
               "components": 8, "layers": 1, "threads": 1},
}


class DemoError(Exception):
    """A problem worth one line to the user (bad input, missing optional package), not a
    traceback."""


@dataclass
class TrainOptions:
    """What ``fastflow train`` was asked for; None means the data set's default.

    ``data`` is a built-in name (:data:`DATASETS`) or the path of a .npy, .csv or .pt file;
    ``dequant`` None means uniform for digits (and must stay None for other data);
    ``progress`` None shows the bar only when stderr is a terminal."""

    data: str = "two_moons"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    hidden: tuple[int, ...] | None = None
    components: int | None = None
    layers: int | None = None
    dequant: str | None = None
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    out: str | None = None
    progress: bool | None = None
    autocast: bool = False

    def resolved(self, key: str):
        value = getattr(self, key)
        kind = "digits" if self.data == "digits" else "2d"
        return DEFAULTS[kind][key] if value is None else value


# ---------------------------------------------------------------------------------------------
# optional dependencies
# ---------------------------------------------------------------------------------------------
def require(module: str, purpose: str):
    """Import an optional package or raise a one-line DemoError saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"sklearn": "scikit-learn"}.get(module.split(".")[0], module.split(".")[0])
        raise DemoError(
            f"{purpose} needs {package}: pip install 'fastflow[demo]' (or pip install {package})"
        ) from None


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    matplotlib = require("matplotlib", "the picture")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "the picture")


# ---------------------------------------------------------------------------------------------
# devices and processes
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when there is a GPU, else the CPU; "cuda" without one is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise DemoError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: CUDA is not available on this machine")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    gloo on the CPU, nccl on CUDA, one GPU per local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            raise DemoError(f"--device cuda under {world} processes needs one GPU per local "
                            f"rank: local rank {local}, {gpus} GPU(s) visible (use --device "
                            "cpu, or fewer processes per node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def load_digits_data() -> torch.Tensor:
    """scikit-learn's bundled 8x8 digits as a (1797, 64) integer tensor in 0..16."""
    datasets = require("sklearn.datasets", "--data digits")
    return torch.from_numpy(datasets.load_digits().data).round().long()


def is_data_file(name: str) -> bool:
    """Whether ``--data`` names a file (by its suffix) rather than a built-in data set."""
    return name not in DATASETS and Path(name).suffix.lower() in DATA_SUFFIXES


def data_label(name: str) -> str:
    """The name used for the default output folder and the picture: the data set's name,
    or a data file's name without its suffix."""
    return Path(name).stem if is_data_file(name) else name


def _read_csv(path: Path) -> torch.Tensor:
    """A CSV file of numbers as a float64 (N, D) tensor. Values are comma separated; blank
    lines and lines starting with # are skipped, and so is a first line in which no value is a
    number (a header of column names). Anything else that is not a number is an error naming
    its line and column."""
    import csv

    rows, width, first = [], None, None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line_no, fields in enumerate(csv.reader(f), 1):
                if not fields or not "".join(fields).strip() or fields[0].lstrip().startswith(
                        "#"):
                    continue
                try:
                    values = [float(v) for v in fields]
                except ValueError:
                    values = None
                if values is None:
                    if (not rows and first is None and not any(_is_number(v) for v in fields)
                            and not any(_other_separator(v) for v in fields)):
                        first = line_no  # a header line
                        continue
                    column, text = next((j, v) for j, v in enumerate(fields, 1)
                                        if not _is_number(v))
                    sep = _other_separator(text)
                    hint = f" (values must be separated by commas, not {sep})" if sep else ""
                    raise DemoError(f"--data {path}: line {line_no}, column {column}: "
                                    f"{text.strip()!r} is not a number{hint}")
                if width is None:
                    width, first = len(values), line_no
                elif len(values) != width:
                    raise DemoError(f"--data {path}: line {line_no} has {len(values)} values "
                                    f"but line {first} has {width}")
                rows.append(values)
    except UnicodeDecodeError:
        raise DemoError(f"--data {path}: not a text file (a CSV must be UTF-8 text)") from None
    except csv.Error as e:
        raise DemoError(f"--data {path}: not a readable CSV file ({_one_line(e)})") from None
    if not rows:
        raise DemoError(f"--data {path}: no rows of numbers in the file")
    return torch.tensor(rows, dtype=torch.float64)


def _other_separator(text: str) -> str | None:
    """The separator's name where ``text`` is several numbers joined by semicolons, tabs or
    spaces (a CSV written with another separator), else None."""
    for sep, name in ((";", "semicolons"), ("\t", "tabs"), (None, "spaces")):
        parts = text.split(sep)
        if len(parts) > 1 and all(_is_number(v) for v in parts):
            return name
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_data_file(name: str) -> torch.Tensor:
    """The (N, D) float32 array in a .npy (numpy.save), .csv (numbers, comma separated) or
    .pt (torch.save of a tensor) file, as given: nothing is standardized or rescaled. A
    one-line DemoError for a missing or unreadable file, non-numeric values, a shape other
    than (N, D), NaN or infinite values (or values beyond float32's range) and fewer than
    MIN_ROWS rows."""
    path = Path(name)
    suffix = path.suffix.lower()
    if not path.exists():
        raise DemoError(f"--data {path}: no such file")
    if not path.is_file():
        raise DemoError(f"--data {path}: not a file")
    if suffix == ".csv":
        x = _read_csv(path)
    elif suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except Exception as e:  # a foreign file fails in many ways (pickle, header, EOF)
            raise DemoError(f"--data {path}: cannot read it as a .npy array "
                            f"({_first_sentence(e)})") from None
        if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
            raise DemoError(f"--data {path}: holds several arrays (an .npz archive), not one "
                            "array; save the (N, D) data with numpy.save")
        if array.dtype.kind not in "iuf":
            raise DemoError(f"--data {path}: holds values of dtype {array.dtype}, not numbers")
        x = torch.from_numpy(np.ascontiguousarray(array))
    else:
        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch.save file, or one holding arbitrary objects
            raise DemoError(f"--data {path}: cannot read it with torch.load "
                            f"({_first_sentence(e)})") from None
        if not isinstance(x, torch.Tensor):
            raise DemoError(f"--data {path}: holds a {type(x).__name__}, not a tensor; save "
                            "the (N, D) data with torch.save(tensor, path)")
        if x.dtype == torch.bool or x.is_complex():
            raise DemoError(f"--data {path}: holds values of dtype {x.dtype}, not real numbers")
        if x.layout != torch.strided:
            raise DemoError(f"--data {path}: holds a {x.layout} tensor; save a dense one "
                            "(x.to_dense())")
        x = x.detach()  # a tensor saved while it required grad is data here
    if x.dim() != 2:
        hint = " (for one feature, save x.reshape(-1, 1))" if x.dim() == 1 else ""
        raise DemoError(f"--data {path}: expected a 2-D (N, D) array, got shape "
                        f"{tuple(x.shape)}{hint}")
    n, d = x.shape
    if d < 1:
        raise DemoError(f"--data {path}: the rows have no values (shape {tuple(x.shape)})")
    if n < MIN_ROWS:
        raise DemoError(f"--data {path}: {n} rows; at least {MIN_ROWS} are needed (a fifth "
                        "is held out as the test set)")
    bad = ~torch.isfinite(x.to(torch.float32)).all(1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        what = "NaN or infinite values" if not torch.isfinite(x[row]).all() else \
            "values beyond float32's range"
        raise DemoError(f"--data {path}: {int(bad.sum())} row(s) hold {what}, the first row "
                        f"{row} (counting from 0); remove or fix them")
    return x.to(torch.float32)


def load_data(name: str, seed: int, train_size: int = 20000, test_size: int = 5000):
    """(train, test): float (n, 2) points for the 2-D sets; for digits integer (n, 64)
    images, a seeded split of the 1797 into 1497 train and 300 test; for a data file its
    float32 rows, a seeded TEST_FRACTION of them the test set."""
    g = torch.Generator().manual_seed(seed)
    if is_data_file(name):
        x = load_data_file(name)
        perm = torch.randperm(len(x), generator=g)
        n_test = max(1, round(TEST_FRACTION * len(x)))
        return x[perm[n_test:]], x[perm[:n_test]]
    if name in DATASETS_2D:
        make = DATASETS_2D[name]
        return make(train_size, generator=g), make(test_size, generator=g)
    if name == "digits":
        x = load_digits_data()
        perm = torch.randperm(len(x), generator=g)
        return x[perm[300:]], x[perm[:300]]
    raise DemoError(_unknown_data(name))


def _unknown_data(name: str) -> str:
    return (f"unknown data set {name!r}; choose from {', '.join(DATASETS)} or give a "
            f"{', '.join(DATA_SUFFIXES[:-1])} or {DATA_SUFFIXES[-1]} file")


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def model_config(opts: TrainOptions, features: int | None = None) -> dict:
    """The plain-Python description of the flow that a checkpoint stores. For a data file,
    ``features`` is its number of columns, and the config records ``"data": "file"`` and the
    file's absolute ``path``."""
    digits = opts.data == "digits"
    file = is_data_file(opts.data)
    if file and features is None:
        raise ValueError("model_config needs the number of features of a data file")
    config = {
        "data": "file" if file else opts.data,
        "features": features if file else 64 if digits else 2,
        "layers": int(opts.resolved("layers")),
        "components": int(opts.resolved("components")),
        "hidden": [int(h) for h in opts.resolved("hidden")],
        "kind": "logistic",
        "logit_alpha": 0.05 if digits else None,
        "levels": DIGIT_LEVELS if digits else None,
    }
    if file:
        config["path"] = str(Path(opts.data).resolve())
    return config


def build_flow(config: dict) -> Flow:
    """Autoregressive mixture-CDF layers (logit output) with a Reverse between each pair, on a
    standard normal base; image data first passes through a Logit squash."""
    D = config["features"]
    transforms = [] if config["logit_alpha"] is None else [Logit(D, alpha=config["logit_alpha"])]
    for i in range(config["layers"]):
        if i:
            transforms.append(Reverse(D))
        transforms.append(AutoregressiveMixtureFlow(
            D, config["components"], list(config["hidden"]), kind=config["kind"],
            output="logit"))
    return Flow(transforms, StandardNormal(D))


def make_dequantizer(kind: str, features: int, levels: int):
    if kind == "uniform":
        return UniformDequantization(features, levels)
    if kind == "variational":
        return VariationalDequantization(features, levels, components=4, hidden_features=(64, 64))
    raise DemoError(f"--dequant must be uniform or variational, got {kind!r}")


class NLLLoss(nn.Module):
    """Mean negative log-likelihood in nats per dimension: of the data itself, or (with a
    dequantizer) the dequantization bound on integer data. Its parameters are the flow's and
    the dequantizer's, so one DistributedDataParallel wrapper covers both."""

    def __init__(self, flow: Flow, dequantizer: nn.Module | None = None):
        super().__init__()
        self.flow, self.dequantizer = flow, dequantizer

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.dequantizer is None:
            return self.flow.log_prob(x)
        y, log_q = self.dequantizer(x)
        return self.flow.log_prob(y) - log_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(x).mean() / self.flow.features


def loss_and_backward(model: nn.Module, batch: torch.Tensor,
                      autocast: bool = False) -> torch.Tensor:
    """One step's gradients: forward the batch, backpropagate the loss, return it (detached).

    ``model`` is an :class:`NLLLoss` or a DistributedDataParallel wrapper of one; under DDP the
    gradients left in the parameters are the average over the ranks, which for equal shards
    equals the gradient of one process on the concatenated batch. ``autocast``: the forward
    in a bfloat16 ``torch.autocast`` region (MADE's products in bfloat16, fastflow's mixture
    ops in float32), the backward outside it, as PyTorch recommends.
    """
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(batch)
    loss.backward()
    return loss.detach()


def draw_batch(data: torch.Tensor, size: int, generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """A minibatch drawn with replacement, moved to the device."""
    idx = torch.randint(0, len(data), (size,), generator=generator)
    return data[idx].to(device)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal: progress bars are drawn by default only then (in a log
    file or a pipe their frames would be clutter)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _progress(steps: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc="training", unit="step", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


def fit(model: nn.Module, train: torch.Tensor, opts: TrainOptions, device: torch.device,
        rank: int, world: int) -> None:
    """Adam with a cosine learning-rate decay; each rank draws its own share of the batch."""
    steps, batch = int(opts.resolved("steps")), int(opts.resolved("batch_size"))
    shard = max(1, batch // world)
    g = torch.Generator().manual_seed(opts.seed * 1000 + rank + 1)
    opt = torch.optim.Adam(model.parameters(), lr=float(opts.resolved("lr")))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    running = None
    show = stderr_is_terminal() if opts.progress is None else opts.progress
    bar = _progress(steps, show and rank == 0)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        loss = loss_and_backward(model, draw_batch(train, shard, g, device), opts.autocast)
        opt.step()
        sched.step()
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if step % 10 == 0 or step == steps - 1:
            value = running.item()
            if not math.isfinite(value):
                raise DemoError(f"training diverged at step {step} (NLL {value}); "
                                "try a smaller --lr")
            bar.set_postfix(nll=f"{value:.3f} nats/dim")
    bar.close()


@torch.no_grad()
def evaluate(loss: NLLLoss, x: torch.Tensor, device: torch.device, repeats: int = 1,
             chunk: int = 4096) -> float:
    """Mean NLL in nats per dimension over x (dequantization bounds averaged over repeats)."""
    total = 0.0
    for _ in range(repeats):
        for part in x.split(chunk):
            total += -loss.log_prob(part.to(device)).sum().item()
    return total / (repeats * len(x) * loss.flow.features)


def train(opts: TrainOptions, stdout=None) -> dict:
    """Run ``fastflow train``: fit, report, and (rank 0) write the checkpoint and picture.

    Returns the metrics (nats and bits per dimension) and the paths written.
    """
    stdout = stdout or sys.stdout
    if opts.data not in DATASETS and not is_data_file(opts.data):
        raise DemoError(_unknown_data(opts.data))
    if opts.dequant is not None and opts.data != "digits":
        raise DemoError(f"--dequant applies only to --data digits, whose pixels are integer "
                        f"grey levels; {opts.data} holds continuous values, used as given")
    train_x, test_x = load_data(opts.data, opts.seed)  # a bad data file fails here
    config = model_config(opts, features=train_x.shape[1])
    rank, world, device = init_distributed(resolve_device(opts.device))
    torch.manual_seed(opts.seed)
    if min(config["hidden"], default=0) < 1 or config["layers"] < 1 or config["components"] < 1:
        raise DemoError("--hidden sizes, --layers and --components must be positive")
    flow = build_flow(config)
    deq = None
    if config["levels"] is not None:
        deq = make_dequantizer(opts.dequant or "uniform", config["features"],
                               config["levels"])
    loss = NLLLoss(flow, deq).to(device)
    model = loss
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(loss, device_ids=[device] if device.type == "cuda"
                                        else None)
    out = Path(opts.out) if opts.out else Path("runs") / data_label(opts.data)
    made: list[Path] = []
    if rank == 0:
        if out.exists() and not out.is_dir():
            raise DemoError(f"--out must name a directory, got the file {str(out)!r}")
        made = [d for d in (out, *out.parents) if not d.exists()]  # removed again on failure
        out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before training
        print(f"fastflow train: {opts.data}, {len(train_x)} train / {len(test_x)} test, "
              f"D={config['features']}, {sum(p.numel() for p in loss.parameters())} parameters, "
              f"device {device}, {world} process{'es' if world > 1 else ''}"
              f"{', bfloat16 autocast' if opts.autocast else ''}", file=stdout)
    previous, threads = fastflow.get_validate_args(), torch.get_num_threads()
    fastflow.set_validate_args(False)  # no host sync per step
    if opts.resolved("threads") and device.type == "cpu":
        torch.set_num_threads(int(opts.resolved("threads")))
    try:
        fit(model, train_x, opts, device, rank, world)
        result = _finish(loss, config, out, train_x, test_x, device, stdout) if rank == 0 \
            else {}
    except BaseException:
        if rank == 0:
            _remove_empty(made)  # a failed run leaves no empty --out folder behind
        raise
    finally:
        fastflow.set_validate_args(previous)
        torch.set_num_threads(threads)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    return result


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created, innermost first, where they are still empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): keep it and everything above it
            return


def _have_pyplot() -> bool:
    try:
        pyplot()
    except DemoError:
        return False
    return True


def _finish(loss: NLLLoss, config: dict, out: Path, train_x, test_x, device,
            stdout) -> dict:
    """Rank 0: evaluate, print, save the checkpoint and the picture."""
    loss.eval()
    repeats = 1 if loss.dequantizer is None else 4
    metrics = {}
    for split, x in (("train", train_x[:5000]), ("test", test_x)):
        nats = evaluate(loss, x, device, repeats)
        metrics[split] = {"nats_per_dim": nats, "bits_per_dim": nats / math.log(2)}
        print(f"{split:5s} NLL {nats:.4f} nats/dim ({nats / math.log(2):.4f} bits/dim)",
              file=stdout)
    ckpt = out / "checkpoint.pt"
    out.mkdir(parents=True, exist_ok=True)  # again: a failed run beside this one may remove it
    save_checkpoint(ckpt, loss.flow, config, metrics)
    print(f"wrote {ckpt}", file=stdout)
    label = Path(config["path"]).stem if config["data"] == "file" else config["data"]
    png = out / f"{label}.png"
    drawable = config["levels"] is not None or config["features"] == 2
    if drawable and not _have_pyplot():
        png = None
        print("no picture: matplotlib is not installed (pip install 'fastflow[demo]')",
              file=stdout)
    elif config["levels"] is not None:
        plot_digits(loss.flow, config, test_x, png, device)
    elif config["features"] == 2:
        plot_2d(loss.flow, train_x, png, device)
    else:
        png = None
        n = config["features"]
        print(f"no picture: the data have {n} feature{'s' if n != 1 else ''} (pictures are "
              "drawn for 2-D data)", file=stdout)
    if png is not None:
        print(f"wrote {png}", file=stdout)
    return {"metrics": metrics, "checkpoint": ckpt, "png": png}


# ---------------------------------------------------------------------------------------------
# checkpoints and sampling
# ---------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, flow: Flow, config: dict, metrics: dict) -> None:
    state = {k: v.detach().cpu() for k, v in flow.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "fastflow_version": fastflow.__version__,
                "config": config, "state_dict": state, "metrics": metrics}, path)


def load_checkpoint(path: str | Path) -> tuple[Flow, dict]:
    """(flow, config) rebuilt from a checkpoint written by ``fastflow train``."""
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoint.pt"
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise DemoError(f"--checkpoint {path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise DemoError(f"no such checkpoint file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files fail in many ways (zip, pickle, EOF)
        what = "it is a numpy .npy file, not a checkpoint" if _starts_with(
            path, b"\x93NUMPY") else "not a checkpoint written by fastflow train, or a damaged one"
        raise DemoError(f"cannot read checkpoint {path}: {what} ({_first_sentence(e)})") \
            from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DemoError(f"{path} is not a checkpoint written by fastflow train")
    try:
        flow = build_flow(ckpt["config"])
        flow.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DemoError(f"checkpoint {path} does not match its model config: "
                        f"{_one_line(e)}") from None
    broken = [name for name, t in flow.state_dict().items()
              if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise DemoError(f"checkpoint {path} holds non-finite weights ({broken[0]}"
                        f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}): "
                        "it cannot give samples or densities")
    return flow, ckpt["config"]


def to_data_units(x: torch.Tensor, config: dict) -> torch.Tensor:
    """Flow samples in the data's own units: 2-D points as they are; digits back on the
    0..levels-1 integer pixel scale (the dequantization cell each sample falls in)."""
    levels = config.get("levels")
    if levels is None:
        return x
    return (x * levels).floor().clamp(0, levels - 1)


@torch.no_grad()
def sample(flow: Flow, config: dict, n: int, device: torch.device) -> torch.Tensor:
    """n samples in data units, on the CPU."""
    flow = flow.to(device).eval()
    previous = fastflow.get_validate_args()
    fastflow.set_validate_args(False)
    try:
        return to_data_units(flow.sample(n), config).cpu()
    finally:
        fastflow.set_validate_args(previous)


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------
def _limits(x: torch.Tensor, margin: float = 0.15) -> tuple[float, float, float, float]:
    lo, hi = x.min(0).values, x.max(0).values
    pad = margin * (hi - lo)
    return (lo[0] - pad[0]).item(), (hi[0] + pad[0]).item(), (lo[1] - pad[1]).item(), \
        (hi[1] + pad[1]).item()


@torch.no_grad()
def density_grid(flow: Flow, limits, device: torch.device, size: int = 200) -> torch.Tensor:
    """p(x) on a size x size grid over limits (x0, x1, y0, y1); rows are y."""
    x0, x1, y0, y1 = limits
    xs, ys = torch.linspace(x0, x1, size), torch.linspace(y0, y1, size)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    return flow.log_prob(grid.to(device)).exp().reshape(size, size).cpu()


def plot_2d(flow: Flow, data: torch.Tensor, path: Path, device: torch.device,
            n: int = 5000) -> None:
    """Three panels: the data, samples from the flow, and its density on a grid."""
    plt = pyplot()
    limits = _limits(data)
    samples = flow.sample(n).cpu()
    density = density_grid(flow, limits, device)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, pts, title in ((axes[0], data[:n], "data"), (axes[1], samples, "samples")):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_title(title)
    axes[2].imshow(density.numpy(), origin="lower", extent=limits, cmap="viridis",
                   aspect="auto")
    axes[2].set_title("learned density")
    for ax in axes:
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[2], limits[3])
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, 8, 8) images tiled into one (rows * 9 - 1, cols * 9 - 1) picture."""
    cols = math.ceil(len(images) / rows)
    canvas = torch.full((rows * 9 - 1, cols * 9 - 1), float("nan"))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = img
    return canvas


def plot_digits(flow: Flow, config: dict, data: torch.Tensor, path: Path,
                device: torch.device, n: int = 64) -> None:
    """Two panels: test digits and samples from the flow, each an 8 x 8 grid of images."""
    plt = pyplot()
    samples = sample(flow, config, n, device)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, imgs, title in ((axes[0], data[:n].float(), "data"), (axes[1], samples, "samples")):
        ax.imshow(_image_grid(imgs.reshape(-1, 8, 8), 8).numpy(), cmap="gray_r", vmin=0,
                  vmax=config["levels"] - 1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _first_sentence(e: BaseException, limit: int = 100) -> str:
    """The gist of a library's error: its message's first sentence on one line, prefixed with
    the exception's type (a KeyError's bare key says nothing by itself). torch.load's
    messages go on to advise weights_only=False, which is no advice for an unknown file."""
    text = _one_line(e, 10_000).split(". ")[0]
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
