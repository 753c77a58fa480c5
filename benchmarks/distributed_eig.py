"""eig() wall time with 1 vs 2 gloo ranks on a model with many layers (same total CPU threads).

Usage: python -m benchmarks.distributed_eig [--layers 12] [--width 768] [--threads 2]
One rank uses all threads; with two ranks each uses half, so the comparison shows the split of the work
(cost-balanced by d³), not extra hardware.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import kfac_hessian as kh


def make(layers: int, width: int):
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*blocks, nn.Linear(width, 10))
    X, y = torch.randn(2 * width, width), torch.randint(0, 10, (2 * width,))
    return kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=0)


def worker(rank, world, store, args, queue):
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        kfac = make(args.layers, args.width)
        kfac.eig(distributed=True)  # warm-up
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            kfac.eig(distributed=True)
            dist.barrier()
            times.append(time.perf_counter() - start)
        if rank == 0:
            queue.put(sorted(times)[len(times) // 2])
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    print(f"| ranks | threads per rank | eig() of {2 * args.layers} factors (d ≈ {args.width}), median s |")
    print("|---|---|---|")
    for world in (1, 2):
        queue = context.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(worker, args=(world, os.path.join(tmp, "store"), args, queue), nprocs=world, join=True,
                               start_method="spawn")
        print(f"| {world} | {max(1, args.threads // world)} | {queue.get():.3f} |", flush=True)


if __name__ == "__main__":
    main()
