"""The demo behind ``fastflow train`` and ``fastflow sample``.

Data sets (generated 2-D shapes and scikit-learn's 8x8 digits), the model built from a plain
config dict (so a checkpoint can rebuild it), the training loop (one process, or one of several
under ``torchrun`` with DistributedDataParallel), evaluation in nats and bits per dimension,
checkpoints and the pictures. matplotlib and scikit-learn are optional and imported only when
needed.
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

from .data import rings, smiley, two_moons
from .distributions import StandardNormal
from .nn import (
    AutoregressiveMixtureFlow,
    Flow,
    Logit,
    Reverse,
    UniformDequantization,
    VariationalDequantization,
)

DATASETS_2D = {"two_moons": two_moons, "rings": rings, "smiley": smiley}
DATASETS = (*DATASETS_2D, "digits")
CHECKPOINT_FORMAT = "fastflow-demo-1"
DIGIT_LEVELS = 17  # load_digits pixels take the values 0..16

# Per data set defaults; the command line overrides any of them. The models are small: one CPU
# thread ran them fastest on a loaded two-core machine (two threads contending with other work
# ran 3x to 10x slower per step in our measurements).
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
    """What ``fastflow train`` was asked for; None means the data set's default."""

    data: str = "two_moons"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    hidden: tuple[int, ...] | None = None
    components: int | None = None
    layers: int | None = None
    dequant: str = "uniform"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    out: str | None = None
    progress: bool = True

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


def load_data(name: str, seed: int, train_size: int = 20000, test_size: int = 5000):
    """(train, test): float (n, 2) points for the 2-D sets; for digits integer (n, 64)
    images, a seeded split of the 1797 into 1497 train and 300 test."""
    g = torch.Generator().manual_seed(seed)
    if name in DATASETS_2D:
        make = DATASETS_2D[name]
        return make(train_size, generator=g), make(test_size, generator=g)
    if name == "digits":
        x = load_digits_data()
        perm = torch.randperm(len(x), generator=g)
        return x[perm[300:]], x[perm[:300]]
    raise DemoError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def model_config(opts: TrainOptions) -> dict:
    """The plain-Python description of the flow that a checkpoint stores."""
    digits = opts.data == "digits"
    return {
        "data": opts.data,
        "features": 64 if digits else 2,
        "layers": int(opts.resolved("layers")),
        "components": int(opts.resolved("components")),
        "hidden": [int(h) for h in opts.resolved("hidden")],
        "kind": "logistic",
        "logit_alpha": 0.05 if digits else None,
        "levels": DIGIT_LEVELS if digits else None,
    }


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


def loss_and_backward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """One step's gradients: forward the batch, backpropagate the loss, return it (detached).

    ``model`` is an :class:`NLLLoss` or a DistributedDataParallel wrapper of one; under DDP the
    gradients left in the parameters are the average over the ranks, which for equal shards
    equals the gradient of one process on the concatenated batch.
    """
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
    bar = _progress(steps, opts.progress and rank == 0)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        loss = loss_and_backward(model, draw_batch(train, shard, g, device))
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
    if opts.data not in DATASETS:
        raise DemoError(f"unknown data set {opts.data!r}; choose from {', '.join(DATASETS)}")
    pyplot()  # fail before training, not after, when matplotlib is missing
    rank, world, device = init_distributed(resolve_device(opts.device))
    torch.manual_seed(opts.seed)
    train_x, test_x = load_data(opts.data, opts.seed)
    config = model_config(opts)
    if min(config["hidden"], default=0) < 1 or config["layers"] < 1 or config["components"] < 1:
        raise DemoError("--hidden sizes, --layers and --components must be positive")
    flow = build_flow(config)
    deq = None
    if config["levels"] is not None:
        deq = make_dequantizer(opts.dequant, config["features"], config["levels"])
    loss = NLLLoss(flow, deq).to(device)
    model = loss
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(loss, device_ids=[device] if device.type == "cuda"
                                        else None)
    out = Path(opts.out) if opts.out else Path("runs") / opts.data
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before training
        print(f"fastflow train: {opts.data}, {len(train_x)} train / {len(test_x)} test, "
              f"D={config['features']}, {sum(p.numel() for p in loss.parameters())} parameters, "
              f"device {device}, {world} process{'es' if world > 1 else ''}", file=stdout)
    previous, threads = fastflow.get_validate_args(), torch.get_num_threads()
    fastflow.set_validate_args(False)  # no host sync per step
    if opts.resolved("threads") and device.type == "cpu":
        torch.set_num_threads(int(opts.resolved("threads")))
    try:
        fit(model, train_x, opts, device, rank, world)
        result = _finish(loss, config, out, train_x, test_x, device, stdout) if rank == 0 \
            else {}
    finally:
        fastflow.set_validate_args(previous)
        torch.set_num_threads(threads)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    return result


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
    save_checkpoint(ckpt, loss.flow, config, metrics)
    png = out / f"{config['data']}.png"
    if config["levels"] is None:
        plot_2d(loss.flow, train_x, png, device)
    else:
        plot_digits(loss.flow, config, test_x, png, device)
    print(f"wrote {ckpt}\nwrote {png}", file=stdout)
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
    if not path.is_file():
        raise DemoError(f"no such checkpoint file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files fail in many ways (zip, pickle, EOF)
        raise DemoError(f"cannot read checkpoint {path}: {_one_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DemoError(f"{path} is not a checkpoint written by fastflow train")
    try:
        flow = build_flow(ckpt["config"])
        flow.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DemoError(f"checkpoint {path} does not match its model config: "
                        f"{_one_line(e)}") from None
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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
