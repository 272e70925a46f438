"""Where a grid's runs execute: one after another in this process (`serial`, the default), or
as tasks on a Ray cluster (`ray`: `pip install 'tscpurify[ray]'`, then `tscpurify bench GRID
--executor ray [--address ADDR]`).

Both keep the same contract, so a grid's rows do not depend on where they ran:
- the driver alone appends to the results file (one writer), and a resumed grid skips the runs
  that finished, whichever executor ran them;
- every run gets `threads` torch threads (the serial executor: the process's own), recorded in
  its row.

Ray only:
- tasks write only into the grid's model cache (`OUT/models`), and read the data set: on a
  cluster, OUT and the data root must be on a file system every node sees;
- each backdoored (or clean) model that the runs share is one task, trained once into the
  grid's model cache; the runs that read it are tasks that take its result as an argument, so
  Ray starts them after it and no two tasks race on the cache folder;
- a run whose task raises is retried once, then written to `failed.jsonl` with its error, and
  the grid goes on (a later invocation tries it again);
- Ctrl-C cancels every task still pending or running, and stops the Ray instance this process
  started (one it joined with --address is left running);
- Ray starts its workers at niceness 15: on a machine busy with other work they yield to it
  and crawl (measured here: 20 steps of a tiny CNN took 48 s instead of 3 s beside two busy
  processes). `RAY_worker_niceness=0` in the environment before the run lets them compete.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import SettingsError

EXECUTORS = ("serial", "ray")
FAILED = "failed.jsonl"


@dataclass(frozen=True)
class RayOptions:
    """How a grid runs on Ray. The resources are what Ray reserves for each task; a run uses
    as many torch threads as it reserves CPUs."""

    address: str | None = None  # a running cluster ("auto", "ray://host:10001"); None: a local one
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0

    def __post_init__(self) -> None:
        if not self.cpus_per_cell > 0 or self.gpus_per_cell < 0:
            raise SettingsError(f"--cpus-per-cell must be > 0 and --gpus-per-cell ≥ 0, got "
                                f"{self.cpus_per_cell} and {self.gpus_per_cell}")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_cell))


def check_device(options: RayOptions, device: str) -> None:
    """Ray places a task on a GPU only when it reserves one: CUDA runs need gpus_per_cell."""
    if device.startswith("cuda") and not options.gpus_per_cell:
        raise SettingsError("--executor ray on --device cuda needs --gpus-per-cell (e.g. 1 or "
                            "0.5), so that Ray places each run on a GPU; or --device cpu")


def import_ray() -> Any:
    """The ray module, or one error line naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise SettingsError("--executor ray needs Ray: pip install 'tscpurify[ray]'") from None
    return ray


def row_name(cell: Any) -> str:
    """A run as people read it: `tsc on badnets:cnn:120 (default)`."""
    return f"{cell.defense} on {cell.name} ({cell.setting})"


def finished_line(cell: Any, row: dict) -> str:
    """One line per finished run, so a grid that runs for hours says what each run gave."""
    after = row.get("after") or {}
    scores = " ".join(f"{name.upper()} {after[name]:.2f}" for name in ("acc", "asr")
                      if after.get(name) is not None)
    return (f"done {row_name(cell)}: {scores}, {row.get('steps', 0)} steps, "
            f"{row.get('seconds', 0.0):.0f} s")


def run_serial(todo: Iterable[Any], run: Callable[[Any], dict], is_done: Callable[[str], bool],
               write: Callable[[dict], None], progress: bool, desc: str) -> None:
    """Run each cell in turn in this process, skipping any another writer finished meanwhile.
    The bar names the run in progress (a row can take hours) and prints each finished one."""
    bar = tqdm(list(todo), desc=desc, disable=not progress)
    for cell in bar:
        if is_done(cell.key):
            continue
        bar.set_postfix_str(row_name(cell), refresh=True)
        row = run(cell)
        write(row)
        if progress:
            bar.write(finished_line(cell, row), file=sys.stderr)


def _with_threads(threads: int, function: Callable[..., Any], *args: Any) -> Any:
    import torch

    torch.set_num_threads(threads)
    return function(*args)


def _train(which: str, cell: Any, out: str, device: str, threads: int) -> str:
    from . import grid

    train = grid.backdoored_model if which == "backdoored" else grid.clean_model
    return str(_with_threads(threads, train, cell, Path(out), device))


def _run(cell: Any, out: str, device: str, threads: int, *models_ready: str) -> dict:
    from . import grid

    # models_ready are the model tasks' results: Ray starts this task only once they exist.
    return _with_threads(threads, grid.run_cell, cell, Path(out), device, False)


def _error_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error  # RayTaskError wraps the task's exception
    return "".join(traceback.format_exception_only(type(cause), cause)).strip()


def run_ray(todo: Iterable[Any], out: Path, device: str, write: Callable[[dict], None],
            options: RayOptions, progress: bool, desc: str,
            models_needed: Callable[[Any], list[tuple[str, str]]]) -> list[dict]:
    """Run the cells as Ray tasks (module docstring); returns the failures it recorded."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    resources = {"num_cpus": options.cpus_per_cell, "num_gpus": options.gpus_per_cell}
    train_task = ray.remote(max_retries=1, retry_exceptions=True, **resources)(_train)
    run_task = ray.remote(max_retries=1, retry_exceptions=True, **resources)(_run)
    cells = list(todo)
    model_refs: dict[tuple[str, str], Any] = {}
    pending: dict[Any, Any] = {}
    for cell in cells:
        ready = []
        for which, key in models_needed(cell):
            if (which, key) not in model_refs:
                model_refs[(which, key)] = train_task.remote(which, cell, str(out), device,
                                                             options.threads)
            ready.append(model_refs[(which, key)])
        pending[run_task.remote(cell, str(out), device, options.threads, *ready)] = cell
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // options.cpus_per_cell))
    failures: list[dict] = []
    bar = tqdm(total=len(cells), desc=desc, disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            try:
                row = ray.get(done[0])
                write(row)
                if progress:
                    bar.write(finished_line(cell, row), file=sys.stderr)
            except ray.exceptions.RayError as error:
                failure = {"key": cell.key, "cell": asdict(cell), "error": _error_line(error)}
                failures.append(failure)
                with (out / FAILED).open("a") as handle:
                    handle.write(json.dumps(failure) + "\n")
            bar.update(1)
            # "running": as many of the pending runs as the cluster has room for.
            bar.set_postfix(done=bar.n - len(failures), running=min(len(pending), slots),
                            failed=len(failures))
    except BaseException:
        for ref in [*pending, *model_refs.values()]:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        if started:
            ray.shutdown()
    return failures
