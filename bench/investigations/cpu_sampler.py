"""Time the CPU inverse and C1's sampler of one or more checkouts, alternating processes.

Each round runs one fresh process per checkout (in the order given), so that the machine's
drifts hit them alike; each process times ``mixture_cdf_inverse_fwd`` at N = 4096, K = 8
(random logistic mixtures, logit targets ~ 2 N(0, 1)), W5's CPU model's ``sample(4096)`` and
its ``log_prob`` (min of 30, 3 and 5 calls). Prints every process's figures, then the min over
processes per checkout.

    python bench/investigations/cpu_sampler.py --rounds 5 OLD_CHECKOUT NEW_CHECKOUT

A checkout is a directory with the ``fastflow`` package (and ``fastflow/kernels``) in it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CODE = r'''
import json, time, torch
from fastflow.cli.bench import FLOW_SIZES, flow_model
from fastflow.reference.mixture_inverse import mixture_cdf_inverse_fwd
D, hidden, K, _, batch = FLOW_SIZES["cpu"]
model = flow_model(D, hidden, K, torch.device("cpu"))
torch.manual_seed(0)
lg, loc = torch.randn(4096, 8), torch.randn(4096, 8)
ls, y = 0.3 * torch.randn(4096, 8), 2 * torch.randn(4096)
def best(fn, n):
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3
with torch.no_grad():
    print(json.dumps({
        "inverse op ms": best(lambda: mixture_cdf_inverse_fwd(y, lg, loc, ls, "logistic",
                                                              "logit"), 30),
        "sample ms": best(lambda: model.sample(batch), 3),
        "log_prob ms": best(lambda: model.log_prob(torch.randn(batch, D)), 5)}))
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkouts", nargs="+", help="directories holding the fastflow package")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    runs = {c: [] for c in args.checkouts}
    for _ in range(args.rounds):
        for c in args.checkouts:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(c)}
            done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True,
                                  text=True, cwd=os.path.abspath(c))
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs[c].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(c, {k: round(v, 2) for k, v in runs[c][-1].items()}, flush=True)
    for c, rows in runs.items():
        print(c, "min over processes:", {k: round(min(r[k] for r in rows), 2) for k in rows[0]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
