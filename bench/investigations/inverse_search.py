"""Randomized search for wrong roots of the float32 inverse over the accuracy contract's ranges.

    python bench/investigations/inverse_search.py [--n 1000000] [--backend reference|triton]
        [--seed 0] [--log-scale 10]

Draws ``--n`` problems per kind (logits uniform in +-50, log_scale in [-10, 10], K uniform in
1..64 per batch, loc spread up to 1000, targets over |logit| <= 80 or z in [1e-30, 1 - 1e-7],
half of the batches "logit" and half "unit" outputs: ``search_problems`` in
tests/test_mixture_inverse.py, whose CI-size test runs the same search), solves them in
float32 and counts per kind and output the wrong roots: solutions neither within
1e-5 (|x| + min_k s_k) of the float64 root nor forward-exact to 1e-5 max(1, |t|) in logit
space (``search_misses``). Also prints the worst error as a fraction of the tolerance: the
smaller of |x - x*| / (1e-5 (|x*| + min_k s_k)), x* the float64 reference's root, and
|logit F64(x) - t| / (1e-5 max(1, |t|)); every figure must be <= 1. The Triton kernels run
under the interpreter on a CPU (about 1-3 ms per program of up to 256 elements): keep
``--n`` to a few 10^4 there. It imports the search from the tests, so it needs the test
extra (``pip install -e ".[test]"``: pytest, hypothesis).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_mixture_inverse import search_misses, search_problems  # noqa: E402

import fastflow  # noqa: E402
from fastflow.reference import mixture_inverse as ref  # noqa: E402

from helpers import oracle  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter runs the kernels in numpy: masked lanes overflow harmlessly.
np.seterr(all="ignore")


def error_fraction(x, y, logits, loc, log_scale, kind, output):
    """Per element, the smaller of the root error and the logit residual, each as a fraction
    of its tolerance (numpy; inf where x is not finite)."""
    params64 = [p.double() for p in (logits, loc, log_scale)]
    x_star, _ = ref.mixture_cdf_inverse_fwd(y.double(), *params64, kind, output)
    x64 = x.double().cpu()
    s_min = params64[2].exp().amin(-1)
    x_err = (x64 - x_star).abs() / (1e-5 * (x_star.abs() + s_min))
    t = y.double() if output == "logit" else torch.log(y.double()) - torch.log1p(-y.double())
    g = oracle(x64, *params64, kind)["logit"]
    y_err = np.abs(g - t.numpy()) / (1e-5 * np.maximum(1.0, np.abs(t.numpy())))
    frac = np.minimum(x_err.numpy(), y_err)
    return np.where(np.isfinite(x64.numpy()), frac, np.inf)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="problems per kind")
    parser.add_argument("--backend", choices=("reference", "triton"), default="reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4096, help="problems per batch (one K)")
    parser.add_argument("--kinds", default="logistic,gaussian")
    parser.add_argument("--log-scale", type=float, default=10.0,
                        help="log_scale uniform in +-this (the contract's range: 10; a "
                             "network's outputs are unbounded)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ["FASTFLOW_BACKEND"] = args.backend
    gen = torch.Generator().manual_seed(args.seed)
    print(f"backend {args.backend}, seed {args.seed}, {args.n} problems per kind, "
          f"log_scale in +-{args.log_scale:g}")
    print("| kind | output | problems | wrong roots | worst error / tolerance | seconds |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        stats = {o: [0, 0, 0.0, 0.0] for o in ("logit", "unit")}
        examples = []
        done = 0
        batch = 0
        while done < args.n:
            n = min(args.batch, args.n - done)
            output = ("logit", "unit")[batch % 2]
            K = int(torch.randint(1, 65, (1,), generator=gen))
            y, *params = search_problems(kind, output, n, K, gen, args.log_scale)
            start = time.perf_counter()
            x, _ = fastflow.mixture_cdf_inverse(*(v.to(DEVICE) for v in (y, *params)),
                                                kind=kind, output=output)
            x = x.cpu()
            elapsed = time.perf_counter() - start
            miss = search_misses(x, y, *params, kind, output)
            frac = error_fraction(x, y, *params, kind, output)
            s = stats[output]
            s[0] += n
            s[1] += int(miss.sum())
            s[2] = max(s[2], float(frac.max()))
            s[3] += elapsed
            for i in np.flatnonzero(miss)[: max(0, 3 - len(examples))]:
                examples.append((output, K, y[i].item(), x[i].item(), frac[i],
                                 [p[i].tolist() for p in params]))
            done += n
            batch += 1
        for output, (count, wrong, worst, secs) in stats.items():
            print(f"| {kind} | {output} | {count} | {wrong} | {worst:.3g} | {secs:.1f} |")
        for output, K, y, x, frac, params in examples:
            print(f"  wrong root ({kind}, {output}, K = {K}): y = {y!r}, x = {x!r}, "
                  f"error / tolerance {frac:.3g}")
            for name, p in zip(("logits", "loc", "log_scale"), params, strict=True):
                print(f"    {name} = {p}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
