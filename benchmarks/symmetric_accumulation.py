"""A/B of the factor accumulation: upper block-triangular strips (the library) vs one full ``addmm_``.

Usage: python -m benchmarks.symmetric_accumulation [--workload mlp] [--n 2048] [--repeats 15]
Both variants of ``compute_kfac(curvature="mc")`` and the gradient floor run interleaved in one process
(the full-product variant swaps ``kfac_hessian.gram.add_gram`` as the Kronecker sums use it for one ``addmm_``).
Prints the median and min seconds and the ratios to the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import kfac_hessian as kh
import kfac_hessian.layers.kronecker as kronecker
from benchmarks.compare import gradient_pass
from benchmarks.models import workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mlp")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    model, loss_fn, data = workload(args.workload, args.n)
    upper = kronecker.add_gram

    def full_product(target, rows):
        target.addmm_(rows, rows.T)

    def mc():
        kh.compute_kfac(model, loss_fn, data, curvature="mc", seed=0)

    def mc_full():
        kronecker.add_gram = full_product
        try:
            mc()
        finally:
            kronecker.add_gram = upper

    cases = {"floor: forward + 1 backward": lambda: gradient_pass(model, loss_fn, data),
             "compute_kfac mc, upper strips": mc, "compute_kfac mc, full addmm_": mc_full}
    times = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    floor_median, floor_min = statistics.median(times[next(iter(cases))]), min(times[next(iter(cases))])
    print(f"| {args.workload}, N={args.n} | median s | min s | median / floor | min / floor min |\n"
          "|---|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f} | {statistics.median(t) / floor_median:.2f} | "
              f"{min(t) / floor_min:.2f} |")


if __name__ == "__main__":
    main()
