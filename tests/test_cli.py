"""The fastflow command line: train / sample / info / bench, its error handling, the smiley data
set, and DistributedDataParallel training on two CPU processes (gloo). Tiny runs: a few
optimizer steps on small networks, so each test takes seconds."""

import contextlib
import io
import math
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastflow.cli import build_parser, main
from fastflow.cli.train import (
    DEFAULTS,
    DemoError,
    NLLLoss,
    TrainOptions,
    build_flow,
    init_distributed,
    load_checkpoint,
    loss_and_backward,
    model_config,
)
from fastflow.data import rings, smiley, two_moons

TINY = ["--steps", "3", "--batch-size", "32", "--hidden", "16,16", "--components", "2",
        "--no-progress"]
NLL_LINE = re.compile(r"^(train|test) +NLL (\S+) nats/dim \((\S+) bits/dim\)$", re.M)


def run(capsys, *argv):
    """(exit code, stdout, stderr) of fastflow.cli.main(argv), in-process."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err


def nlls(out):
    """{split: (nats/dim, bits/dim)} parsed from train's report."""
    found = {m[1]: (float(m[2]), float(m[3])) for m in NLL_LINE.finditer(out)}
    assert set(found) == {"train", "test"}, out
    return found


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    """One tiny two-moons training run shared by the sampling tests."""
    out = tmp_path_factory.mktemp("moons")
    assert main(["train", "--data", "two_moons", "--out", str(out), *TINY]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["two_moons", "rings", "smiley"])
def test_train_2d_writes_checkpoint_and_picture(data, tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", data, "--out", str(tmp_path), *TINY)
    assert code == 0, err
    for nats, bits in nlls(out).values():
        assert math.isfinite(nats) and bits == pytest.approx(nats / math.log(2), rel=1e-3)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["data"] == data and ckpt["config"]["hidden"] == [16, 16]
    png = tmp_path / f"{data}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_learns(tmp_path, capsys):
    """More steps give a lower test NLL than a handful: the loop really optimises."""
    short, long = (run(capsys, "train", "--out", str(tmp_path / str(s)), "--steps", str(s),
                       "--hidden", "32,32", "--components", "4", "--no-progress")
                   for s in (2, 150))
    assert short[0] == 0 and long[0] == 0
    # measured: 1.13 nats/dim after 2 steps, 0.55 after 150
    assert nlls(long[1])["test"][0] < nlls(short[1])["test"][0] - 0.3


def test_train_with_autocast_learns_and_says_so(tmp_path, capsys, monkeypatch):
    """--autocast: the forward in a bfloat16 region, reported on the first line; training still
    learns (the products' rounding is far below what 150 steps gain), and the gradients reach
    the parameters in float32 (the optimizer would fail on any other dtype)."""
    regions = []
    real = torch.autocast

    def spy(*args, **kwargs):
        regions.append(kwargs.get("enabled", True) and kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    short, long = (run(capsys, "train", "--out", str(tmp_path / str(s)), "--steps", str(s),
                       "--hidden", "32,32", "--components", "4", "--no-progress",
                       "--autocast")
                   for s in (2, 150))
    assert short[0] == 0 and long[0] == 0, long[2]
    assert "bfloat16 autocast" in long[1].splitlines()[0]
    assert torch.bfloat16 in regions
    assert nlls(long[1])["test"][0] < nlls(short[1])["test"][0] - 0.3


def test_train_defaults_to_runs_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "train", "--data", "smiley", *TINY)
    assert code == 0
    assert (tmp_path / "runs" / "smiley" / "checkpoint.pt").is_file()
    assert (tmp_path / "runs" / "smiley" / "smiley.png").is_file()


@pytest.mark.parametrize("dequant", ["uniform", "variational"])
def test_train_digits_and_sample(dequant, tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", "digits", "--dequant", dequant,
                         "--out", str(tmp_path), *TINY)
    assert code == 0, err
    assert "1497 train / 300 test" in out
    for nats, _ in nlls(out).values():
        assert math.isfinite(nats) and nats > 0
    assert (tmp_path / "digits.png").read_bytes()[:4] == b"\x89PNG"
    npy = tmp_path / "s.npy"
    code, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path / "checkpoint.pt"),
                       "-n", "7", "--out", str(npy))
    assert code == 0, err
    x = np.load(npy)
    assert x.shape == (7, 64) and ((x >= 0) & (x <= 16) & (x == np.floor(x))).all()


def test_digits_without_scikit_learn_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    code, _, err = run(capsys, "train", "--data", "digits", "--out", str(tmp_path), *TINY)
    assert_one_line_error(code, err, "scikit-learn", "fastflow[demo]")


def test_train_without_matplotlib_trains_and_says_there_is_no_picture(tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, stdout, err = run(capsys, "train", "--out", str(tmp_path), *TINY)
    assert code == 0, err
    assert "no picture: matplotlib is not installed" in stdout
    assert (tmp_path / "checkpoint.pt").exists() and not list(tmp_path.glob("*.png"))


# ---------------------------------------------------------------------------------------------
# train --data FILE
# ---------------------------------------------------------------------------------------------
def write_data(path: Path, x) -> Path:
    """Save an array the way each format is usually written: numpy.save, a CSV with a header
    line of column names, torch.save of a tensor."""
    x = np.asarray(x)
    if path.suffix == ".npy":
        np.save(path, x)
    elif path.suffix == ".csv":
        header = ",".join(f"x{j}" for j in range(x.shape[1]))
        np.savetxt(path, x, delimiter=",", header=header, comments="")
    else:
        torch.save(torch.from_numpy(x), path)
    return path


def test_train_on_data_files_in_each_format(tmp_path, capsys):
    """The same points from a .npy, .csv and .pt file train the same flow; the values are
    used as given: the flow's NLL on the file's rows, computed here from the checkpoint,
    is the reported train and test NLLs' average (240 and 60 rows)."""
    x = two_moons(300, generator=torch.Generator().manual_seed(0)).numpy()
    reports = {}
    for suffix in (".npy", ".csv", ".pt"):
        data = write_data(tmp_path / f"moons{suffix}", x)
        out = tmp_path / suffix[1:]
        code, stdout, err = run(capsys, "train", "--data", str(data), "--out", str(out), *TINY)
        assert code == 0, err
        assert f"fastflow train: {data}, 240 train / 60 test, D=2" in stdout
        reports[suffix] = nlls(stdout)
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["config"]["data"] == "file" and ckpt["config"]["features"] == 2
        assert ckpt["config"]["path"] == str(data.resolve())
        assert (out / "moons.png").read_bytes()[:4] == b"\x89PNG"
        flow, _ = load_checkpoint(out / "checkpoint.pt")
        with torch.no_grad():
            whole = (-flow.log_prob(torch.from_numpy(x)).mean() / 2).item()
        (train, _), (test, _) = reports[suffix]["train"], reports[suffix]["test"]
        assert whole == pytest.approx((240 * train + 60 * test) / 300, abs=2e-4)
    assert reports[".npy"] == reports[".csv"] == reports[".pt"]
    # A tensor saved while it required grad is data like any other (it crashed training).
    torch.save(torch.from_numpy(x).requires_grad_(), tmp_path / "grad.pt")
    code, stdout, err = run(capsys, "train", "--data", str(tmp_path / "grad.pt"), "--out",
                            str(tmp_path / "grad"), *TINY)
    assert code == 0, err
    assert nlls(stdout) == reports[".pt"]


def test_train_on_a_3d_file_writes_no_picture_and_samples_in_3d(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path / "cube.npy", np.random.default_rng(0).normal(size=(50, 3)))
    code, out, err = run(capsys, "train", "--data", "cube.npy", *TINY)
    assert code == 0, err
    assert "D=3" in out and "no picture: the data have 3 features" in out
    run_dir = tmp_path / "runs" / "cube"  # the default folder is named after the file
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt"]
    code, _, err = run(capsys, "sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "-n",
                       "5", "--out", "s.npy")
    assert code == 0, err
    assert np.load(tmp_path / "s.npy").shape == (5, 3)


def _rows(n=20, d=2):
    return np.random.default_rng(1).normal(size=(n, d))


def _csv(text):
    return lambda p: p.write_text(text)


BAD_FILES = [
    ("missing.npy", None, "no such file"),
    ("folder.npy", lambda p: p.mkdir(), "not a file"),
    ("garbage.npy", lambda p: p.write_bytes(b"not an array at all"), "cannot read it as a .npy"),
    ("archive.npy", lambda p: np.savez(p.open("wb"), a=_rows()), "an .npz archive"),
    ("words.npy", lambda p: np.save(p, np.array([["a", "b"]] * 20)), "not numbers"),
    ("flat.npy", lambda p: np.save(p, np.zeros(20)), "got shape (20,)"),
    ("cube.npy", lambda p: np.save(p, np.zeros((20, 2, 2))), "got shape (20, 2, 2)"),
    ("empty_rows.npy", lambda p: np.save(p, np.zeros((20, 0))), "the rows have no values"),
    ("few.npy", lambda p: np.save(p, _rows(9)), "9 rows; at least 10"),
    ("nan.npy", lambda p: np.save(p, np.vstack([_rows(), [[np.nan, 0.0]]])),
     "1 row(s) hold NaN or infinite values, the first row 20"),
    ("huge.npy", lambda p: np.save(p, np.full((20, 2), 1e300)), "beyond float32's range"),
    ("inf.csv", _csv("1,2\n" * 15 + "inf,0\n"), "NaN or infinite"),
    ("words.csv", _csv("a,b\n" + "1,2\n" * 5 + "3,abc\n" + "1,2\n" * 10),
     "line 7, column 2: 'abc' is not a number"),
    ("ragged.csv", _csv("1,2\n3,4,5\n" + "1,2\n" * 10), "line 2 has 3 values but line 1 has 2"),
    ("empty.csv", _csv(""), "no rows of numbers"),
    ("semicolons.csv", _csv("1;2\n" * 20),
     "line 1, column 1: '1;2' is not a number (values must be separated by commas, not semicolons"),
    ("tabs.csv", _csv("x\ty\n" + "1\t2\n" * 20), "line 2, column 1: '1\\t2' is not a number"),
    ("binary.csv", lambda p: p.write_bytes(b"\xff\xfe\x00\x81" * 10), "not a text file"),
    ("dict.pt", lambda p: torch.save({"x": torch.zeros(20, 2)}, p), "holds a dict, not a tensor"),
    ("garbage.pt", lambda p: p.write_bytes(b"{"), "cannot read it with torch.load"),
    ("flags.pt", lambda p: torch.save(torch.ones(20, 2, dtype=torch.bool), p), "not real numbers"),
    ("sparse.pt", lambda p: torch.save(torch.eye(20, 2).to_sparse(), p), "save a dense one"),
]


@pytest.mark.parametrize("name, write, needle", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_files_are_one_line_errors_and_write_nothing(name, write, needle, tmp_path,
                                                             capsys):
    path = tmp_path / name
    if write is not None:
        write(path)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "train", "--data", str(path), "--out", str(out), *TINY)
    assert_one_line_error(code, err, str(path), needle)
    assert not out.exists() and "NLL" not in stdout


def test_data_that_is_neither_a_name_nor_a_known_file_type(tmp_path, capsys):
    (tmp_path / "points.txt").write_text("1 2\n" * 20)
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "points.txt"), "--out",
                       str(tmp_path / "out"), *TINY)
    assert_one_line_error(code, err, "two_moons", ".npy, .csv or .pt", "points.txt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data", ["two_moons", "file"])
def test_dequant_is_refused_where_it_does_not_apply(data, tmp_path, capsys):
    if data == "file":
        data = str(write_data(tmp_path / "pts.npy", _rows()))
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", "--data", data, "--dequant", "variational", "--out",
                       str(out), *TINY)
    assert_one_line_error(code, err, "--dequant applies only to --data digits")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# help and progress
# ---------------------------------------------------------------------------------------------
def _subparsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


@pytest.mark.parametrize("command", ["train", "sample"])
def test_help_states_every_flags_default(command, capsys):
    for action in _subparsers()[command]._actions:
        if action.dest != "help" and not action.required:
            assert "(default: " in action.help, action.option_strings
        assert action.help, action.option_strings
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    if command == "train":
        d2, dg = DEFAULTS["2d"], DEFAULTS["digits"]
        assert f"optimizer steps (default: {d2['steps']}; digits: {dg['steps']})" in text
        assert f"(default: {d2['lr']}; digits: {dg['lr']})" in text
        assert f"(default: {','.join(map(str, d2['hidden']))}; digits: " in text
        assert "(default: two_moons)" in text and "used as given" in text
        assert "(default: only when stderr is a terminal)" in text
    else:
        assert "(default: 1000)" in text and "written by fastflow train" in text


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """capsys's stderr is no terminal: no bar unless asked for; as if it were one, a bar."""
    argv = ["train", "--steps", "3", "--batch-size", "32", "--hidden", "16,16",
            "--components", "2"]
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "a"))
    assert code == 0 and err == "" and "NLL" in out
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "b"), "--progress")
    assert code == 0 and "training" in err and "3/3" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "c"))
    assert code == 0 and "training" in err
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "d"), "--no-progress")
    assert code == 0 and err == ""


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------
def test_sample_writes_finite_points(moons_run, tmp_path, capsys):
    npy = tmp_path / "samples.npy"
    code, out, err = run(capsys, "sample", "--checkpoint", str(moons_run / "checkpoint.pt"),
                         "-n", "123", "--out", str(npy), "--seed", "5")
    assert code == 0, err
    x = np.load(npy)
    assert x.shape == (123, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert x.std(0).min() > 0.01  # not a constant
    again = tmp_path / "again.npy"
    run(capsys, "sample", "--checkpoint", str(moons_run / "checkpoint.pt"), "-n", "123",
        "--out", str(again), "--seed", "5")
    np.testing.assert_array_equal(np.load(again), x)


def test_out_paths_that_cannot_be_written_are_clear_errors(moons_run, tmp_path, capsys):
    """A file given as train's --out directory, and a sample --out in a missing directory,
    are one-line errors naming --out (not a raw OS error), and nothing is written."""
    existing = tmp_path / "a_file"
    existing.write_text("")
    code, _, err = run(capsys, "train", "--out", str(existing), "--steps", "1")
    assert_one_line_error(code, err, "--out must name a directory", "a_file")
    target = tmp_path / "missing" / "x.npy"
    code, _, err = run(capsys, "sample", "--checkpoint", str(moons_run / "checkpoint.pt"),
                       "-n", "3", "--out", str(target))
    assert_one_line_error(code, err, "--out's directory", "does not exist")
    assert not target.parent.exists()


def test_sample_matches_the_trained_flow(moons_run):
    """The checkpoint rebuilds the same density: log p from the rebuilt flow equals the one
    computed from the raw state dict loaded into a fresh model."""
    from fastflow.cli.train import load_checkpoint

    flow, config = load_checkpoint(moons_run / "checkpoint.pt")
    ckpt = torch.load(moons_run / "checkpoint.pt", weights_only=True)
    fresh = build_flow(config)
    assert not torch.equal(fresh.transforms[0].made.output.weight,
                           ckpt["state_dict"]["transforms.0.made.output.weight"])
    fresh.load_state_dict(ckpt["state_dict"])
    x = torch.randn(10, 2)
    torch.testing.assert_close(flow.log_prob(x), fresh.log_prob(x))


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path / "nope.pt"), "-n", "3",
                       "--out", str(tmp_path / "x.npy"))
    assert_one_line_error(code, err, "no such checkpoint file", "nope.pt")


@pytest.mark.parametrize("content", [b"this is not a checkpoint", b""])
def test_corrupt_checkpoint(content, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    code, _, err = run(capsys, "sample", "--checkpoint", str(bad), "-n", "3",
                       "--out", str(tmp_path / "x.npy"))
    assert_one_line_error(code, err, "cannot read checkpoint", "bad.pt")
    assert not (tmp_path / "x.npy").exists()


def test_checkpoint_that_is_a_directory(moons_run, tmp_path, capsys):
    code, _, err = run(capsys, "sample", "--checkpoint", str(moons_run), "--out",
                       str(tmp_path / "x.npy"))
    assert_one_line_error(code, err, f"--checkpoint {moons_run} is a directory",
                          f"did you mean {moons_run / 'checkpoint.pt'}?")
    code, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path), "--out",
                       str(tmp_path / "x.npy"))
    assert_one_line_error(code, err, "is a directory, not a checkpoint file")
    assert "did you mean" not in err and not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("name, write, needle", [
    ("data.npy", lambda p: np.save(p, np.zeros((3, 2))), "it is a numpy .npy file"),
    ("data.csv", lambda p: p.write_text("1,2\n3,4\n"), "not a checkpoint written by"),
    ("tensor.pt", lambda p: torch.save(torch.zeros(3), p), "not a checkpoint written by"),
])
def test_non_checkpoint_files(name, write, needle, tmp_path, capsys):
    write(tmp_path / name)
    code, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path / name), "--out",
                       str(tmp_path / "x.npy"))
    assert_one_line_error(code, err, name, needle)
    assert "weights_only" not in err  # torch.load's advice is no advice here
    assert not (tmp_path / "x.npy").exists()


def test_foreign_and_mismatched_checkpoints(moons_run, tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    code, _, err = run(capsys, "sample", "--checkpoint", str(foreign), "--out",
                       str(tmp_path / "x.npy"))
    assert_one_line_error(code, err, "not a checkpoint written by fastflow train")
    ckpt = torch.load(moons_run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["hidden"] = [17, 16]
    mismatched = tmp_path / "mismatched.pt"
    torch.save(ckpt, mismatched)
    code, _, err = run(capsys, "sample", "--checkpoint", str(mismatched), "--out",
                       str(tmp_path / "x.npy"))
    assert_one_line_error(code, err, "does not match its model config")
    # Non-finite weights: refused, not sampled (sample turns the value checks off, and the
    # samples came out as 1.7e38 everywhere).
    ckpt = torch.load(moons_run / "checkpoint.pt", weights_only=True)
    next(v for v in ckpt["state_dict"].values() if v.is_floating_point()).fill_(math.nan)
    broken = tmp_path / "broken.pt"
    torch.save(ckpt, broken)
    code, _, err = run(capsys, "sample", "--checkpoint", str(broken), "--out",
                       str(tmp_path / "x.npy"))
    assert_one_line_error(code, err, "holds non-finite weights")
    assert not (tmp_path / "x.npy").exists()


# ---------------------------------------------------------------------------------------------
# usage errors, info, bench
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["train", "--stepz", "3"],
    ["train", "--steps", "0"],
    ["train", "--hidden", "16,x"],
    ["train", "--data", "mnist"],
    ["train", "--device", "tpu"],
    ["sample", "-n", "3"],
    ["frobnicate"],
    [],
    ["bench", "--size", "bogus"],
    ["bench", "--workloads", "W9"],
])
def test_bad_flags_are_one_line_errors(argv, capsys):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "error:")


def test_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    code, out, err = run(capsys, "train", "--out", str(taken), *TINY)
    assert_one_line_error(code, err, "taken")
    assert "NLL" not in out  # it failed before training
    code, out, err = run(capsys, "bench", "--size", "tiny", "--workloads", "W1", "--out",
                         str(taken))
    assert_one_line_error(code, err, "--out", "taken", "is a file")
    assert taken.read_text() == ""


def test_a_run_that_fails_in_training_leaves_no_empty_out_folder(tmp_path, capsys, monkeypatch):
    import fastflow.cli.train as train_module

    def broken_fit(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "fit", broken_fit)
    fresh = tmp_path / "new" / "run"
    assert run(capsys, "train", "--out", str(fresh), *TINY)[0] == 130  # interrupted
    assert not (tmp_path / "new").exists()  # both folders it made are gone
    kept = tmp_path / "kept"
    (kept / "notes").mkdir(parents=True)
    assert run(capsys, "train", "--out", str(kept / "run"), *TINY)[0] == 130
    assert sorted(p.name for p in kept.iterdir()) == ["notes"]  # the user's folder stays


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "train", "--device", "cuda", "--out", str(tmp_path), *TINY)
    assert_one_line_error(code, err, "CUDA is not available")


def test_help_exits_zero(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(c in out for c in ("train", "sample", "info", "bench"))


def test_info_names_versions_and_backends(capsys, monkeypatch):
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f"torch {torch.__version__}" in out and "numpy " in out and "triton " in out
    assert "backend for CPU tensors: reference" in out
    assert "backend for CUDA tensors: triton" in out
    assert f"cuda available {'yes' if torch.cuda.is_available() else 'no'}" in out
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code, out, _ = run(capsys, "info")
    assert "backend for CPU tensors: triton" in out and "TRITON_INTERPRET on" in out
    monkeypatch.setenv("FASTFLOW_BACKEND", "bogus")
    code, _, err = run(capsys, "info")
    assert_one_line_error(code, err, "FASTFLOW_BACKEND")


def test_bench_without_the_runner(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastflow.cli.bench", None)  # import fails as if absent
    code, out, err = run(capsys, "bench", "--quick")
    assert_one_line_error(code, err)
    assert err.strip() == "fastflow bench: the benchmark runner is not part of this installation"


def test_bench_forwards_its_arguments(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("fastflow.cli.bench")
    fake.main = lambda argv, parser_class: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fastflow.cli.bench", fake)
    assert main(["bench", "--sizes", "1,2", "--help"]) == 3
    assert seen == [["--sizes", "1,2", "--help"]]


def test_console_entry_point_runs_as_a_program(tmp_path):
    """python -m fastflow (and fastflow.cli): exit codes reach the shell; errors stay one
    line."""
    ok = subprocess.run([sys.executable, "-m", "fastflow", "info"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "backend for CPU tensors" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fastflow.cli", "sample", "--checkpoint",
                          str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# smiley data
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [two_moons, rings, smiley])
def test_data_sets_refuse_bad_sizes_and_noise(make):
    for n in ("10", 10.5, 0, True):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            make(n)
    with pytest.raises(ValueError, match="noise must be a real number, got nan"):
        make(10, float("nan"))
    for noise in (-1.0, math.inf):
        with pytest.raises(ValueError, match="noise must be a finite standard deviation"):
            make(10, noise)
    assert make(3, 0).shape == (3, 2)


def test_smiley_points_lie_on_the_face():
    g = torch.Generator().manual_seed(0)
    x = smiley(4000, noise=0.0, generator=g)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    outline = (x.norm(dim=-1) - 1.0).abs() < 1e-5
    eyes = torch.stack([((x - c).norm(dim=-1) - 0.12).abs() < 1e-5
                        for c in (torch.tensor([-0.35, 0.35]), torch.tensor([0.35, 0.35]))])
    angle = torch.atan2(x[:, 1], x[:, 0]) % (2 * math.pi)
    mouth = ((x.norm(dim=-1) - 0.55).abs() < 1e-5) & (angle > math.radians(199.9)) & (
        angle < math.radians(340.1))
    assert (outline | eyes.any(0) | mouth).all()
    shares = torch.stack([outline, eyes[0], eyes[1], mouth]).float().mean(1)
    torch.testing.assert_close(shares, torch.tensor([0.5, 0.1, 0.1, 0.3]), atol=0.03, rtol=0)


def test_smiley_is_seeded_noisy_and_checks_n():
    a = smiley(100, generator=torch.Generator().manual_seed(1))
    b = smiley(100, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, smiley(100, generator=torch.Generator().manual_seed(2)))
    off = (a.norm(dim=-1) - 1.0).abs().min()
    assert off < 0.2 and smiley(100, noise=0.2).std() > smiley(100, noise=0.0).std() * 0.9
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        smiley(0)


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel on two CPU processes
# ---------------------------------------------------------------------------------------------
CONFIG = model_config(TrainOptions(hidden=(16, 16), components=3, layers=2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives each process, then the CLI's own process-group setup."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    got_rank, got_world, device = init_distributed(torch.device("cpu"))
    assert (got_rank, got_world, device.type) == (rank, world, "cpu")
    assert dist.get_backend() == "gloo"


def _ddp_gradient_worker(rank, world, port, shards, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    _join(rank, world, port)
    torch.manual_seed(100 + rank)  # different inits: DDP must broadcast rank 0's parameters
    loss = NLLLoss(build_flow(CONFIG)).double()
    loss_and_backward(DistributedDataParallel(loss), shards[rank])
    grads = {name: p.grad for name, p in loss.named_parameters()}
    state = {name: p.detach() for name, p in loss.named_parameters()}
    torch.save({"grads": grads, "params": state}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch = smiley(64, generator=g).double()
    shards = list(batch.chunk(2))
    mp.spawn(_ddp_gradient_worker, args=(2, _free_port(), shards, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(100)  # rank 0's initialisation
    single = NLLLoss(build_flow(CONFIG)).double()
    for name, p in single.named_parameters():
        torch.testing.assert_close(results[1]["params"][name], p.detach())  # broadcast
    loss_and_backward(single, batch)
    for name, p in single.named_parameters():
        for r in range(2):
            torch.testing.assert_close(results[r]["grads"][name], p.grad, rtol=1e-6, atol=1e-9)
    assert any(p.grad.abs().max() > 1e-3 for p in single.parameters())


def _ddp_train_worker(rank, world, port, out_dir):
    _join(rank, world, port)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", "--data", "two_moons", "--out", str(Path(out_dir) / "run"),
                     "--steps", "2", "--batch-size", "16", "--hidden", "8", "--components",
                     "2", "--device", "cpu", "--no-progress"])
    Path(out_dir, f"rank{rank}.txt").write_text(f"{code}\n{printed.getvalue()}")
    assert not dist.is_initialized()


def test_train_under_two_processes_reports_and_writes_on_rank_0_only(tmp_path):
    mp.spawn(_ddp_train_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert rank1 == "0\n"  # exit code 0, nothing printed: no report, no files written
    assert rank0.startswith("0\n") and "2 processes" in rank0
    nlls(rank0)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt",
                                                                      "two_moons.png"]


def test_more_cuda_ranks_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DemoError, match="local rank 1, 1 GPU"):
        init_distributed(torch.device("cuda"))


def test_a_closed_stdout_ends_the_command_quietly(capsys, monkeypatch):
    """`fastflow info | head -1` closes the pipe early: a BrokenPipeError then ends the
    command with status 0 and no error line (it printed 'error: [Errno 32] Broken pipe')."""
    import fastflow.cli as cli

    def closed(argv):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_run", closed)
    code, _, err = run(capsys, "info")
    assert code == 0 and err == ""
