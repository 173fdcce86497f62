"""The ``fastflow`` command: train, sample, info, bench.

``main(argv)`` returns the exit code instead of exiting, so it can be called in-process; the
console script and ``python -m fastflow.cli`` pass it to ``sys.exit``. Expected problems (a bad
flag, a missing file, an unreadable checkpoint, a missing optional package) print one line on
stderr and give exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from types import SimpleNamespace

EXIT_USAGE = 2


class _Failure(Exception):
    """A complete one-line message for stderr."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (argparse's default also prints the usage)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(h) for h in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 128,128, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


def _positive(convert, what: str):
    """An argparse type: ``convert(text)`` that must be > 0."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        return value
    return parse


_positive_int = _positive(int, "integer")
_positive_float = _positive(float, "number")


def _data(text: str) -> str:
    """An argparse type for --data: a built-in data set's name or a .npy/.csv/.pt path (the
    file itself is read, and checked, when training starts)."""
    from .train import DATA_SUFFIXES, DATASETS, is_data_file

    if text in DATASETS or is_data_file(text):
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(DATASETS)} or a {', '.join(DATA_SUFFIXES[:-1])} or "
        f"{DATA_SUFFIXES[-1]} file, got {text!r}")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default: auto, CUDA when there is a GPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _default(key: str, show=str) -> str:
    """'(default: X; digits: Y)' from the per-data-set defaults that training uses, so the
    help cannot drift from them."""
    from .train import DEFAULTS

    other, digits = show(DEFAULTS["2d"][key]), show(DEFAULTS["digits"][key])
    return f"(default: {other})" if other == digits else f"(default: {other}; digits: {digits})"


def _sizes(sizes) -> str:
    return ",".join(str(h) for h in sizes)


def build_parser() -> argparse.ArgumentParser:
    from .train import DATASETS, MIN_ROWS, TEST_FRACTION

    parser = _Parser(prog="fastflow", description="Mixture-CDF normalizing flows: demo, "
                     "sampling, environment report and benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    train = sub.add_parser(
        "train", help="fit a flow to a built-in data set or a data file, write a checkpoint "
        "and a picture", description="Fit autoregressive mixture-CDF layers to the data by "
        "maximum likelihood, print train and test NLL (nats and bits per dimension), and "
        "write DIR/checkpoint.pt and, for 2-D data and digits, a picture.")
    train.add_argument(
        "--data", type=_data, default="two_moons", metavar="NAME|FILE",
        help=f"a built-in data set ({', '.join(DATASETS)}) or a file holding an (N, D) array "
        "of numbers: .npy (numpy.save), .csv (comma separated; a header line of names is "
        "skipped) or .pt (torch.save of a tensor). File data are used as given, not "
        "standardized or rescaled (the flow starts near unit scale, so rescale data far from "
        f"it first); a seeded {TEST_FRACTION * 100:.0f}%% of the rows is held out as the test "
        f"set; at least {MIN_ROWS} rows (default: two_moons)")
    train.add_argument("--out", metavar="DIR", help="output folder (default: ./runs/DATA, "
                       "DATA the data set's name or the file's name without its suffix)")
    train.add_argument("--steps", type=_positive_int,
                       help=f"optimizer steps {_default('steps')}")
    train.add_argument("--batch-size", type=_positive_int,
                       help=f"global minibatch size {_default('batch_size')}")
    train.add_argument("--lr", type=_positive_float,
                       help=f"Adam learning rate, decayed by a cosine {_default('lr')}")
    train.add_argument("--hidden", type=_hidden, metavar="H1,H2,...",
                       help=f"MADE hidden layer sizes {_default('hidden', _sizes)}")
    train.add_argument("--components", type=_positive_int,
                       help=f"mixture components {_default('components')}")
    train.add_argument("--layers", type=_positive_int,
                       help=f"autoregressive layers {_default('layers')}")
    train.add_argument("--dequant", choices=("uniform", "variational"),
                       help="dequantization of digits' integer grey levels; refused for other "
                       "data (default: uniform)")
    train.add_argument("--threads", type=_positive_int,
                       help=f"CPU threads, fastest for these small models {_default('threads')}")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="a progress bar on stderr with the running NLL; the report prints "
                       "either way (default: only when stderr is a terminal)")
    train.add_argument("--autocast", action="store_true",
                       help="train with the forward pass in a bfloat16 torch.autocast region "
                       "(the network's products in bfloat16, the mixture ops in float32); "
                       "the NLL is evaluated in float32 either way (default: float32 "
                       "throughout)")
    _add_device(train)

    smp = sub.add_parser("sample", help="draw samples from a checkpoint into a .npy file")
    smp.add_argument("--checkpoint", required=True, metavar="FILE",
                     help="a checkpoint.pt written by fastflow train (it records the model, "
                     "so no other flags are needed)")
    smp.add_argument("-n", type=_positive_int, default=1000,
                     help="number of samples (default: 1000)")
    smp.add_argument("--out", required=True, metavar="FILE.npy",
                     help="where to write the samples, an (n, D) array in the data's units")
    _add_device(smp)

    sub.add_parser("info", help="versions, devices and which backend each device uses")
    sub.add_parser("bench", help="run the benchmarks (arguments go to the benchmark runner)",
                   add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .train import TrainOptions, train

    opts = TrainOptions(data=args.data, steps=args.steps, batch_size=args.batch_size,
                        lr=args.lr, hidden=args.hidden, components=args.components,
                        layers=args.layers, dequant=args.dequant, device=args.device,
                        threads=args.threads, seed=args.seed, out=args.out,
                        progress=args.progress, autocast=args.autocast)
    train(opts)
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .train import DemoError, load_checkpoint, resolve_device, sample

    if not args.out.endswith(".npy"):
        raise DemoError(f"--out must name a .npy file, got {args.out!r}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise DemoError(f"--out's directory {folder!r} does not exist")
    device = resolve_device(args.device)
    flow, config = load_checkpoint(args.checkpoint)
    torch.manual_seed(args.seed)
    x = sample(flow, config, args.n, device)
    np.save(args.out, x.numpy())
    print(f"wrote {args.n} samples of dimension {x.shape[-1]} to {args.out}")
    return 0


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def info_lines() -> list[str]:
    """What ``fastflow info`` prints: versions, devices, the backend each device uses."""
    import torch

    import fastflow

    from ..ops.dispatch import backend_for

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    # backend_for only looks at the tensor's device, so a stand-in answers for CUDA without one
    cuda_tensor = torch.empty(0, device="cuda") if cuda else SimpleNamespace(is_cuda=True)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return [
        f"fastflow {fastflow.__version__}",
        f"torch {torch.__version__}",
        f"triton {_version('triton')}",
        f"numpy {_version('numpy')}",
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"cpu threads {torch.get_num_threads()}",
        f"cuda available {'yes' if cuda else 'no'} (device: {gpu}, torch cuda "
        f"{torch.version.cuda or 'none'})",
        f"backend for CPU tensors: {backend_for(torch.empty(0))}",
        f"backend for CUDA tensors: {backend_for(cuda_tensor)}",
        f"FASTFLOW_BACKEND={os.environ.get('FASTFLOW_BACKEND', 'auto')}",
        f"TRITON_INTERPRET {'on' if interpret else 'off'}",
    ]


def cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


def cmd_bench(argv: list[str]) -> int:
    """Hand the arguments to fastflow.cli.bench.main when this installation has it."""
    try:
        benchmark = importlib.import_module("fastflow.cli.bench")
    except ModuleNotFoundError as e:
        if e.name != "fastflow.cli.bench":
            raise _Failure(f"fastflow bench: the benchmark runner needs {e.name}: "
                           "pip install 'fastflow[bench]'") from None
        raise _Failure("fastflow bench: the benchmark runner is not part of this "
                       "installation") from None
    return int(benchmark.main(list(argv), parser_class=_Parser) or 0)


_COMMANDS = {"train": cmd_train, "sample": cmd_sample, "info": cmd_info}


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    return _COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code (0 on success, 2 on a usage error)."""
    from .train import DemoError

    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    prog = f"fastflow {command}".strip()
    try:
        return _run(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, message already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except _Failure as e:
        print(str(e), file=sys.stderr)
    except BrokenPipeError:  # stdout closed early (fastflow info | head): nothing to report
        _silence_stdout()
        return 0
    except (DemoError, OSError, ValueError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


def _silence_stdout() -> None:
    """Point stdout at os.devnull, so that the interpreter's flush at exit does not meet the
    closed pipe again (Python's documented way out of a BrokenPipeError)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


if __name__ == "__main__":
    sys.exit(main())
