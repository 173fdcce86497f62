"""The one-pass sampler's kernel at W5's sizes, compiled for sm_90 without a GPU: its loops
and what one sampling step issues.

Records the launch ``fastflow.kernels.autoregressive.autoregressive_solve`` makes for W5's
model (D = 784, hidden [1024, 1024], K = 10, batch 4096, mixture of logistics, logit output,
sampling direction), compiles it for sm_<arch> with ptxas, finds the loops in the SASS (a
backward branch closes one) and prints each loop's own instructions (nested loops excluded)
by class, nested as in the code. Then, from the model's degree table, how many times each
loop of the network runs in one step on average, and the instructions one warp issues per
step for the network and the head (the solve's iterations are data-dependent: given per
iteration). Static counts, a proxy for the issue time of one warp, not a measurement.

    python bench/investigations/sass_solve.py [--arch 90] [--tf32] [--sass DIR]

``--tf32`` compiles the specialisation taken when torch.backends.cuda.matmul.allow_tf32 is
True (tensor-core dots); PyTorch's default (False) takes the IEEE fp32 dots.

TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from fastflow.kernels import autoregressive as kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compile_check  # noqa: E402  (bench/compile_check.py)

CLASSES = {
    "global loads": ("LDG", "LDGSTS"),
    "global stores": ("STG",),
    "shared": ("LDS", "STS", "LDSM"),
    "barriers": ("BAR",),
    "fp32 FMA/MUL/ADD": ("FFMA", "FMUL", "FADD"),
    "tensor core": ("HMMA", "HGMMA"),
    "MUFU": ("MUFU",),
    "shuffles": ("SHFL",),
}
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse(sass: str):
    """[(address, opcode, text)] and the loops [(start, end)] closed by backward branches."""
    instrs, loops = [], []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2).strip()
        words = body.split()
        op = words[1] if words[0].startswith("@") else words[0]
        op = op.split(".")[0]
        instrs.append((addr, op, body))
        if op == "BRA":
            target = int(body.split()[-1].rstrip(";"), 16)
            if target < addr:
                loops.append((target, addr))
    return instrs, sorted(loops, key=lambda r: (r[0], -r[1]))


def own_counts(instrs, loop, loops):
    """Opcode counts of the instructions inside ``loop`` but in none of its nested loops."""
    inner = [r for r in loops if r != loop and loop[0] <= r[0] and r[1] <= loop[1]]
    counts = Counter()
    for addr, op, _ in instrs:
        if loop[0] <= addr <= loop[1] and not any(a <= addr <= b for a, b in inner):
            counts[op] += 1
    return counts


def depth(loop, loops):
    return sum(1 for r in loops if r != loop and r[0] <= loop[0] and loop[1] <= r[1])


def summary(counts: Counter) -> str:
    parts = [f"{sum(counts.values())} instructions"]
    for name, ops in CLASSES.items():
        n = sum(counts[o] for o in ops)
        if n:
            parts.append(f"{n} {name}")
    return ", ".join(parts)


def trip_counts(plan, D: int):
    """Mean per step of: the layer loop's unit chunks, their input chunks (k loop) and the
    head's chunks, with the kernel's LAUNCH block sizes."""
    tab = plan["table"].tolist()
    bn, bh = kernel.LAUNCH["block_n"], kernel.LAUNCH["block_h"]
    layers = len(plan["weights"])
    n_chunks = k_chunks = head = 0
    for t in range(D):
        for layer in range(layers):
            start, end, seen = tab[layer + 1][t], tab[layer + 1][t + 1], tab[layer][t + 1]
            n = math.ceil((end - start) / bn)
            n_chunks += n
            k_chunks += n * math.ceil(seen / bh)
        head += math.ceil(tab[layers][t + 1] / bh)
    return n_chunks / D, k_chunks / D, head / D


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--sass", default=None, help="keep the SASS in this folder")
    args = parser.parse_args(argv)
    from fastflow.nn import AutoregressiveMixtureFlow

    D, hidden, K, B = 784, [1024, 1024], 10, 4096
    torch.manual_seed(0)
    flow = AutoregressiveMixtureFlow(D, K, hidden, output="logit")
    plan = flow.made.sequential_plan()
    specs = []
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    try:
        with torch.no_grad(), compile_check.recording(specs):
            kernel.autoregressive_solve(
                torch.randn(B, D), plan["weights"], plan["biases"], plan["table"],
                plan["order"], plan["out_weight"], plan["out_bias"], K, "logistic", "logit",
                True, False, "relu")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    sass_dir = args.sass or tempfile.mkdtemp(prefix="fastflow-sass-")
    r = compile_check.compile_spec(specs[0], args.arch, sass_dir)
    if not r["ok"]:
        raise SystemExit(r["error"])
    with open(r["sass"]) as f:
        instrs, loops = parse(f.read())
    warps = dict(specs[0].options)["num_warps"]
    print(f"{specs[0].name()}\nsm_{args.arch}, {warps} warps, {r['registers']} registers, "
          f"{r['spill']} bytes of stack, {r['shared']} bytes of shared memory, "
          f"{r['instructions']} instructions in all\n")
    print("Loops, outermost first (each line: its own instructions, nested loops excluded):\n")
    for loop in loops:
        counts = own_counts(instrs, loop, loops)
        print(f"{'  ' * depth(loop, loops)}- [{loop[0]:#06x}, {loop[1]:#06x}]: "
              f"{summary(counts)}")
    n_chunks, k_chunks, head = trip_counts(plan, D)
    print(f"\nPer step on average (LAUNCH {kernel.LAUNCH}): {n_chunks:.2f} unit chunks over the "
          f"hidden layers, {k_chunks:.1f} input chunks (the k loop's trips), {head:.1f} head "
          "chunks.")
    print(f"\nSASS in {sass_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
