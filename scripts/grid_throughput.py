"""Grid throughput of the bench executors on this machine: cells per hour run serially, and as
Ray tasks with 1 and with 2 workers (issue #22's measurement).

A small grid of tiny models on a small Fashion-MNIST-format data set written here (so it needs
no download): 2 attacks × 2 seeds × (FT, Fine-Pruning), 8 cells and 4 backdoored models, each
executor in a fresh output folder. Every run takes one torch thread (Ray gives each task as many
threads as CPUs it reserves: one here), so the serial executor and a one-CPU Ray do the same
work and differ by Ray's overhead; a two-CPU Ray shows what a second core buys. The numbers
depend on what else the machine runs: say so when you quote them.

    python scripts/grid_throughput.py                 # the table
    python scripts/grid_throughput.py --cells-only    # the grid's size, nothing run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GRID = """
seeds = [0, 1]
attacks = ["badnets", "blended"]
defenses = ["ft", "fine_pruning"]
[data]
name = "fashion-mnist"
root = "{root}"
clean_fraction = 0.2
batch_size = 32
[models.cnn]
width = 4
epochs = {epochs}
[defense_args.ft]
epochs = 2
[defense_args.fine_pruning]
epochs = 2
"""


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships it (big-endian header, gzipped)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_data(root: Path, train: int, test: int) -> None:
    """Class-dependent stripes plus noise: learnable in an epoch, in Fashion-MNIST's format."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 80, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, :, 2 * label:2 * label + 3] += 150
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


def timed(run) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2, help="backdoor training epochs")
    parser.add_argument("--ray-workers", default="1,2",
                        help="Ray sizes to time after the serial executor (empty: none)")
    parser.add_argument("--cells-only", action="store_true")
    args = parser.parse_args()

    from tscpurify.bench.executors import RayOptions, import_ray
    from tscpurify.bench.grid import read_grid, run_grid

    with tempfile.TemporaryDirectory(prefix="grid-throughput-") as temporary:
        work = Path(temporary)
        write_data(work, args.train_images, 500)
        grid = work / "grid.toml"
        grid.write_text(GRID.format(root=work, epochs=args.epochs))
        cells = len(read_grid(grid).cells)
        if args.cells_only:
            print(f"{cells} cells")
            return
        torch.set_num_threads(1)
        rows = [("serial", 1, timed(lambda: run_grid(grid, work / "serial", progress=False)))]
        sizes = [int(n) for n in args.ray_workers.split(",") if n]
        ray = import_ray() if sizes else None
        # Ray's workers otherwise run at niceness 15 and yield to everything else (Ray's own
        # spelling of the variable).
        os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112
        for workers in sizes:  # a local Ray with that many CPUs, one per cell
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")
            try:
                out = work / f"ray{workers}"
                seconds = timed(lambda: run_grid(grid, out, progress=False,  # noqa: B023
                                                 ray=RayOptions(cpus_per_cell=1)))
            finally:
                ray.shutdown()
            rows.append(("ray", workers, seconds))
    load = os.getloadavg()[0]
    print(f"{cells} cells (and their backdoored models), torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, 1-minute load average after the runs {load:.1f}\n")
    print("| executor | workers | wall seconds | cells per hour |")
    print("|---|---|---|---|")
    for executor, workers, seconds in rows:
        print(f"| {executor} | {workers} | {seconds:.0f} | {cells * 3600 / seconds:.0f} |")
    print(json.dumps({"cells": cells, "rows": rows, "load": load}))


if __name__ == "__main__":
    main()
