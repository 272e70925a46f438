"""Wall time of one distributed purification on 1, 2, ... processes (torchrun, data-parallel).

    python scripts/distributed_timing.py                          # 1 and 2 processes, CPU
    python scripts/distributed_timing.py --processes 1 2 4 --device cuda --width 64
    python scripts/distributed_timing.py --width 4 --images 64 --epochs 1   # a smoke run

For each process count it launches `torchrun --standalone --nproc_per_node N` on this script,
whose workers run `purify(..., distributed=True)` on the same random CIFAR-10-shaped data
with the same global batch (so every count does the same steps over the same data), and
prints one table row: processes, threads per process, wall seconds of the whole launch
(start-up included), purify's own seconds (rank 0's report), and the speed-up of purify's
seconds over the first count's. The data are random images: time does not depend on their
content.

Read the numbers with the machine in mind: N processes need N free cores (or GPUs) to run at
once. On a machine whose cores are busy with other work the processes share what is left, and
the numbers measure that contention, not the method: say so when you report them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULT = "distributed-timing:"  # the line rank 0 prints its result on


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from tscpurify import TSCSettings, purify
    from tscpurify import distributed as dist
    from tscpurify.models import create_model
    from tscpurify.settings import replace_settings

    torch.set_num_threads(args.threads)
    device = dist.init(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    torch.manual_seed(0)
    if args.model == "resnet":
        model = create_model("preactresnet18", num_classes=10, in_channels=3, width=args.width)
    else:
        model = create_model("cnn", num_classes=10, in_channels=3, image_size=32,
                             width=args.width)
    model = model.to(device)
    settings = replace_settings(TSCSettings(), rounds=1, epochs=args.epochs, ft_epochs=0,
                                final_ft_epochs=args.epochs, profile_points=0,
                                batch_size=args.batch_size)
    began = time.perf_counter()
    _, report = purify(model, DataLoader(TensorDataset(images, labels)), settings,
                       progress=False, distributed=True)
    seconds = time.perf_counter() - began
    if dist.is_main():
        print(RESULT, json.dumps({"purify_seconds": seconds, "steps": report.steps,
                                  "phases": report.seconds}), flush=True)


def launch(processes: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), str(Path(__file__).resolve()), "--worker",
               "--device", args.device, "--model", args.model, "--width", str(args.width),
               "--images", str(args.images), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"{processes} processes failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT))
    return {"processes": processes, "wall_seconds": wall,
            **json.loads(line[len(RESULT):])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU a process)")
    parser.add_argument("--model", choices=("cnn", "resnet"), default="cnn")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--images", type=int, default=1024, help="clean images")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs of each curve and of the last fine-tune (one round)")
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads a process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [launch(n, args) for n in args.processes]
    print("| processes | threads each | wall s (launch) | purify s | speed-up |")
    print("|---|---|---|---|---|")
    for row in rows:
        speedup = rows[0]["purify_seconds"] / row["purify_seconds"]
        print(f"| {row['processes']} | {args.threads} | {row['wall_seconds']:.1f} | "
              f"{row['purify_seconds']:.1f} | {speedup:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
