"""Command line: `tscpurify attack | encoder | evaluate | purify | demo | bench`.

Thin by design: parse flags → settings → one library call. Errors of the user's making
(TscpurifyError) become one line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError, SettingsError, SpecError, TscpurifyError
from .job import resolve_device
from .outputs import write_atomic
from .settings import add_settings_flags, finite_float, overrides_from_args, settings_from_args
from .training import TrainSettings
from .version import __version__

log = logging.getLogger("tscpurify")


def parse_pairs(pairs: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """['size=4', 'pattern=white'] → {'size': 4, 'pattern': 'white'} (values parsed as JSON
    when they look like JSON, else kept as strings)."""
    result: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SettingsError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            result[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            result[key.replace("-", "_")] = value
    return result


def add_common(parser: argparse.ArgumentParser, device_and_seed: bool = True) -> None:
    """--quiet, and --device and --seed with JobSettings' defaults (purify generates those two
    with the rest of its JobSettings flags)."""
    from .job import JobSettings

    if device_and_seed:
        fields = JobSettings.__dataclass_fields__
        parser.add_argument("--device", default=fields["device"].default,
                            help=f"{fields['device'].metadata['help']} (default: auto)")
        parser.add_argument("--seed", type=int, default=fields["seed"].default,
                            help=f"random seed (default: {fields['seed'].default})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_attack_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="fashion-mnist",
                        help="fashion-mnist, cifar10 or folder (default: fashion-mnist)")
    parser.add_argument("--data-root", default=None,
                        help="folder of the data files (cifar10: data_batch_*.bin; folder: "
                             "train/ and test/ with one sub-folder per class)")
    parser.add_argument("--attack", default="badnets",
                        help="attack name, or none for the same model trained without poison "
                             "(the re-tuning floor) (default: badnets)")
    parser.add_argument("--target", type=int, default=0, help="target class (default: 0)")
    parser.add_argument("--rate", type=float, default=0.1, help="poison rate in (0, 1)")
    parser.add_argument("--all-to-all", action="store_true",
                        help="triggered class y goes to y+1 instead of one target")
    parser.add_argument("--attack-arg", action="append", metavar="KEY=VALUE",
                        help="attack-specific argument (repeatable), with its default: "
                             + attack_arg_help())
    parser.add_argument("--model", default="cnn",
                        help="cnn, mlp, vgg, preactresnet18 or resnet18 (default: cnn)")
    parser.add_argument("--width", type=int, default=None, help="model width (channels)")
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                        help="extra model keyword argument, e.g. depth=13 (repeatable)")
    add_settings_flags(parser, TrainSettings)


def attack_arg_help() -> str:
    """Each attack's own arguments with their defaults, from its dataclass (fitted state such
    as a learned trigger, default None, is not an argument)."""
    import dataclasses

    from .attacks import ATTACKS

    shared = {"target", "rate", "all_to_all"}  # flags of their own
    parts = []
    for name in ATTACKS.names():
        fields = [f"{f.name}={f.default:g}" if isinstance(f.default, float)
                  else f"{f.name}={f.default}"
                  for f in dataclasses.fields(ATTACKS.get(name))
                  if f.name not in shared and f.default is not None
                  and f.default is not dataclasses.MISSING
                  and not f.metadata.get("transient")]
        parts.append(f"{name}: {', '.join(fields)}")
    return "; ".join(parts).replace("%", "%%")


def run_attack(args: argparse.Namespace) -> int:
    from .runs import train_backdoored

    attack_args = {"target": args.target, "rate": args.rate, "all_to_all": args.all_to_all,
                   **parse_pairs(args.attack_arg, "--attack-arg")}
    attack = None if args.attack == "none" else args.attack
    if attack is None and args.attack_arg:
        raise SettingsError("--attack none takes no --attack-arg")
    model_args = parse_pairs(args.model_arg, "--model-arg")
    if args.width is not None:
        model_args["width"] = args.width
    metrics = train_backdoored(
        args.out, data=args.data, data_root=args.data_root, attack=attack,
        attack_args=attack_args if attack else None, model=args.model, model_args=model_args,
        train=settings_from_args(TrainSettings, args), seed=args.seed,
        device=resolve_device(args.device), progress=not args.quiet, overwrite=args.overwrite)
    if attack is None:
        print(f"clean model written to {args.out}: ACC {metrics.acc:.2f}%")
    else:
        print(f"backdoored model written to {args.out}: ACC {metrics.acc:.2f}%  "
              f"ASR {metrics.asr:.2f}%  RA {metrics.ra:.2f}%")
    return 0


def add_encoder_flags(parser: argparse.ArgumentParser) -> None:
    from .attacks.badencoder import BadEncoderSettings
    from .evaluation import ProbeSettings
    from .runs import ENCODER_ATTACKS, EncoderRunSettings
    from .ssl import SimCLRSettings

    parser.add_argument("--data", default="fashion-mnist",
                        help="fashion-mnist, cifar10 or folder (default: fashion-mnist)")
    parser.add_argument("--data-root", default=None,
                        help="folder of the data files (as for `tscpurify attack`)")
    parser.add_argument("--attack", default="badencoder", choices=ENCODER_ATTACKS,
                        help="badencoder: pre-train clean, then fine-tune with a BadNets patch "
                             "trigger toward target-class reference images; ctrl: pre-train on "
                             "images of which 1%% (target class only) carry a frequency "
                             "trigger; none: a clean encoder (default: badencoder)")
    parser.add_argument("--target", type=int, default=0, help="target class (default: 0)")
    parser.add_argument("--rate", type=float, default=None,
                        help="ctrl only: poisoned share of the pre-training images "
                             "(default: 0.01, the paper's)")
    parser.add_argument("--attack-arg", action="append", metavar="KEY=VALUE",
                        help="trigger argument: for ctrl e.g. magnitude=100 or window=14, for "
                             "badencoder the BadNets patch's, e.g. size=4 (repeatable)")
    parser.add_argument("--trunk", default="cnn", choices=("cnn", "resnet18"),
                        help="encoder trunk (default: cnn)")
    parser.add_argument("--width", type=int, default=16, help="trunk width (default: 16)")
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                        help="extra simclr model argument, e.g. proj_dim=32 (repeatable)")
    add_settings_flags(parser, EncoderRunSettings)
    add_settings_flags(parser, SimCLRSettings)
    add_settings_flags(parser, BadEncoderSettings, prefix="badencoder-")
    add_settings_flags(parser, ProbeSettings, prefix="probe-")


def run_encoder(args: argparse.Namespace) -> int:
    from .attacks.badencoder import BadEncoderSettings
    from .evaluation import ProbeSettings
    from .runs import EncoderRunSettings, train_encoder
    from .ssl import SimCLRSettings

    attack_args = parse_pairs(args.attack_arg, "--attack-arg")
    if args.rate is not None:
        if args.attack != "ctrl":
            raise SettingsError(f"--rate applies to ctrl only: {args.attack} poisons no "
                                f"pre-training data")
        attack_args["rate"] = args.rate
    model_args = {"width": args.width, **parse_pairs(args.model_arg, "--model-arg")}
    metrics = train_encoder(
        args.out, data=args.data, data_root=args.data_root, attack=args.attack,
        target=args.target, attack_args=attack_args, trunk=args.trunk, model_args=model_args,
        run=settings_from_args(EncoderRunSettings, args),
        simclr=settings_from_args(SimCLRSettings, args),
        bad=settings_from_args(BadEncoderSettings, args, prefix="badencoder-"),
        probe=settings_from_args(ProbeSettings, args, prefix="probe-"),
        seed=args.seed, device=resolve_device(args.device), progress=not args.quiet,
        overwrite=args.overwrite)
    print(f"encoder written to {args.out}: {format_metrics(metrics, encoder=True)}")
    return 0


def format_metrics(metrics: dict, encoder: bool = False) -> str:
    """'ACC 90.00%  ASR 1.00%  RA 88.00%' (+ kNN ACC), skipping what was not measured."""
    names = {"acc": "ACC", "asr": "ASR", "ra": "RA", "knn_acc": "kNN ACC"}
    line = "  ".join(f"{label} {metrics[key]:.2f}%" for key, label in names.items()
                     if metrics.get(key) is not None)
    return f"linear probe {line}" if encoder else line


def run_evaluate(args: argparse.Namespace) -> int:
    from .runs import evaluate_run, retune_run

    if args.retune_floor and not args.retune:
        raise SettingsError("--retune-floor needs --retune")
    # The re-tune first: it checks its settings, the run's attack and the floor before any
    # training, so a bad --retune-* input fails before the evaluation (an encoder's probe
    # training can take minutes) rather than after it.
    retune = (retune_run(args.run, retune_settings(args), args.retune_floor, seed=args.seed,
                         device=resolve_device(args.device), progress=not args.quiet,
                         trusted_arch=args.arch)
              if args.retune else None)
    metrics = evaluate_run(args.run, resolve_device(args.device), args.arch)
    if retune is not None:
        metrics["retune"] = retune
    print(json.dumps(metrics))
    return 0


def add_purify_flags(parser: argparse.ArgumentParser) -> None:
    from .defenses.tsc import PRESETS, TSCSettings

    parser.add_argument("--preset", "--variant", default="default", choices=sorted(PRESETS),
                        help="named TSC settings; single flags below override it "
                             "(default: default)")
    from .job import JobSettings

    add_settings_flags(parser, JobSettings)
    add_settings_flags(parser, TSCSettings)
    add_retune_flags(parser)


def add_retune_flags(parser: argparse.ArgumentParser, default: bool = True,
                     what: str = "after purifying a classifier whose attack is recorded, re-tune "
                                 "the suspect and the purified model") -> None:
    from .retune import RetuneSettings

    parser.add_argument("--retune", action=argparse.BooleanOptionalAction, default=default,
                        help=f"{what} on a few poisoned samples, to see whether the backdoor "
                             f"comes back (default: {'on' if default else 'off'})")
    parser.add_argument("--retune-floor", default=None, metavar="RUN",
                        help="a run folder of the same model trained without poison "
                             "(tscpurify attack --attack none), re-tuned the same way: the "
                             "floor to compare with")
    add_settings_flags(parser, RetuneSettings, prefix="retune-")


def retune_settings(args: argparse.Namespace):
    from .retune import RetuneSettings

    return settings_from_args(RetuneSettings, args, prefix="retune-") if args.retune else None


def tsc_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TSC settings the user set by flag; `purification.resolve_settings` puts them on
    the --preset (the SSL one for the SimCLR loss), as it does for `purify_run(overrides=)`."""
    from .defenses.tsc import TSCSettings

    return overrides_from_args(TSCSettings, args)


def print_report_summary(report, out: str) -> None:
    from .report.concerns import concerns
    from .run_kinds import KINDS

    before, after = report.before, report.after
    line = (f"ACC {before['acc']:.2f}% → {after['acc']:.2f}%")
    if before.get("asr") is not None:
        line += f"   ASR {before['asr']:.2f}% → {after['asr']:.2f}%"
    line = KINDS[report.source.get("kind", "classifier")].label + line
    print(f"purified model written to {out}: {line}")
    if report.symmetry:
        print(f"permutation symmetry: {report.symmetry['groups']} groups, moving "
              f"{100 * report.symmetry['coverage']:.1f}% of the weights")
    if report.retune:
        at = report.retune["after"]["epochs"]
        print("re-tuned on a few poisoned samples, ASR after epochs "
              + ", ".join(map(str, at)) + ": "
              + "; ".join(f"{name} " + " / ".join(f"{a:.1f}%" for a in p["asr"])
                          for name, p in report.retune.items()))
    for concern in concerns(report):  # beside the numbers they qualify
        print(f"warning: {concern}", file=sys.stderr)
    print(f"report: {Path(out) / 'report.md'} (plots in {Path(out) / 'plots'})")


def run_purify(args: argparse.Namespace) -> int:
    from .checkpoint import WEIGHTS
    from .distributed import is_main
    from .job import JobSettings
    from .purification import purify_run
    from .runs import write_own_run

    own = {"--data": args.data, "--data-root": args.data_root, "--model-arg": args.model_arg}
    if args.weights is None:
        if args.run is None:
            raise SettingsError("give the suspect model: a run folder, or --weights FILE --arch "
                                "ARCH --data NAME for a model trained elsewhere")
        given = [flag for flag, value in own.items() if value]
        if given:
            verb = "describes" if len(given) == 1 else "describe"
            raise SettingsError(f"{', '.join(given)} {verb} a --weights file; a run folder "
                                f"records its own")
    elif args.run is not None:
        raise SettingsError(f"give a run folder ({args.run}) or --weights, not both")
    elif not args.arch or not args.data:
        raise SettingsError("--weights needs --arch (a registered model or your "
                            "module:function) and --data (the data set it was trained on)")

    job = settings_from_args(JobSettings, args)
    resolve_device(job.device)  # a missing GPU fails before a --weights folder is made

    def purify_folder(run: str | Path, **more: Any) -> int:
        report = purify_run(run, args.out, preset=args.preset, overrides=tsc_overrides(args),
                            job=job, progress=not args.quiet,
                            resume=args.resume, overwrite=args.overwrite,
                            retune=retune_settings(args), retune_floor=args.retune_floor,
                            trusted_arch=args.arch, leaf_modules=args.leaf_module or (),
                            **more)
        if is_main():  # under torchrun: one summary, rank 0's
            print_report_summary(report, args.out)
        return 0

    if args.weights is None:
        return purify_folder(args.run)
    # A model trained elsewhere: a temporary run folder around its weights (linked, not
    # copied, where the disk allows), purified like any other; the user's files stay inputs.
    with tempfile.TemporaryDirectory(prefix="tscpurify-own-") as temporary:
        try:
            run = write_own_run(temporary, args.weights, args.arch,
                                model_args=parse_pairs(args.model_arg, "--model-arg"),
                                data=args.data, data_root=args.data_root)
            return purify_folder(run, source=str(args.weights), more_inputs=[
                args.weights, *([args.data_root] if args.data_root else [])])
        except CheckpointError as err:
            # The temporary folder is gone when the user reads this: name their file instead.
            raise CheckpointError(str(err).replace(str(Path(temporary) / WEIGHTS),
                                                   str(args.weights))) from None


def run_demo(args: argparse.Namespace) -> int:
    from .job import JobSettings
    from .outputs import atomic_folder, check_out
    from .purification import purify_run
    from .runs import train_backdoored

    out = check_out(args.out, args.overwrite)
    device = resolve_device(args.device)
    # Built in a temporary folder: an existing demo folder (--overwrite) is replaced only once
    # the new one is complete, never emptied first.
    with atomic_folder(out, args.overwrite) as building:
        print("1/2 training a backdoored model (BadNets on Fashion-MNIST, small CNN) ...")
        metrics = train_backdoored(building / "backdoored", attack="badnets", model="cnn",
                                   model_args={"width": 16}, train=TrainSettings(),
                                   seed=args.seed, device=device, progress=not args.quiet)
        print(f"    ACC {metrics.acc:.2f}%  ASR {metrics.asr:.2f}%  RA {metrics.ra:.2f}%")
        print("2/2 purifying it with TSC on 5% clean training data ...")
        report = purify_run(building / "backdoored", building / "purified",
                            preset=args.preset, overrides=tsc_overrides(args),
                            job=JobSettings(seed=args.seed, device=device),
                            progress=not args.quiet, source=str(out / "backdoored"))
    print_report_summary(report, str(out / "purified"))
    return 0


def failed_runs(out: Path) -> int:
    """Lines of a bench folder's failed.jsonl (runs the Ray executor gave up on)."""
    from .bench.executors import FAILED

    path = out / FAILED
    return len(path.read_text().splitlines()) if path.exists() else 0


def print_plan(lines: list[dict], out: Path) -> None:
    """bench --plan: runs done and left per part, model and row, and the hours left where this
    folder's finished runs of the same row and model give a median; a row with none is
    estimated (~) from its step budget (bench.plan.estimated_seconds), and counted apart;
    the models still to train come first (bench.plan.MODELS_ROW)."""
    from .bench.plan import MODELS_ROW

    print(f"| part | model | row | done | left | median seconds a run (in {out}) | hours left |")
    print("|---|---|---|---|---|---|---|")
    known, possible, estimated, unknown = 0.0, 0.0, 0.0, 0
    for line in lines:
        median, left = line["median_seconds"], line["left"]
        guess = line.get("estimated_seconds")
        each = median if median is not None else guess
        hours = None if each is None else left * each / 3600
        if hours is not None and median is None:
            estimated += hours
        elif hours is not None and line["possible"]:
            possible += hours
        elif hours is not None:
            known += hours
        elif line["defense"] not in ("none", "clean_floor"):
            unknown += left
        left_text = f"up to {left}" if line["possible"] else str(left)
        mark = "" if median is not None else "~"
        print(f"| {line['part']} | {line['model']} | {line['defense']} | {line['done']} | "
              f"{left_text} | {'–' if each is None else f'{mark}{each:.0f}'} | "
              f"{'–' if hours is None else f'{mark}{hours:.1f}'} |")
    parts = [f"about {known:.1f} hours left at this folder's own pace (one process)"]
    if possible:
        parts.append(f"up to {possible:.1f} more for tuned rows still waiting for their tuning")
    if estimated:
        parts.append(f"~{estimated:.1f} estimated for rows that have not run here yet")
    if unknown:
        parts.append(f"{unknown} run(s) with nothing to time them by")
    print("\n" + "; ".join(parts) + ".")
    print(f"How it is timed: a row by the median of its finished runs on the same model here; a "
          f"row that has not run here (~) by its step budget times its seconds a step on "
          f"another model (here or in --pace-from folders) scaled between the models, else its "
          f"model's seconds a step (defenses differ per step: a rough guide). A tuned row says "
          f"'up to' until its defense's tuning has chosen (a choice equal to the default shares "
          f"its run). {MODELS_ROW}: the suspect and clean models the runs read, each counted "
          f"once, timed by trained models of the same architecture and training here (else in "
          f"--pace-from folders, ~).")


def run_bench(args: argparse.Namespace) -> int:
    from .bench.grid import (
        Selection,
        finished_rows,
        parse_shard,
        read_all,
        read_grid,
        run_grid,
        tuning_choice,
        tuning_rows,
    )
    from .bench.plan import plan
    from .bench.tables import markdown_table, plot_bench, stages_table, tuning_table
    from .bench.tuning import summarise

    grid = read_grid(args.grid)  # every key checked before anything trains
    parse_shard(args.shard)
    Selection.parse(args.rows, args.cells, grid)
    status = 0
    ray = None
    if args.executor == "ray":
        from .bench.executors import RayOptions, check_device, import_ray

        ray = RayOptions(address=args.address, cpus_per_cell=args.cpus_per_cell or 1.0,
                         gpus_per_cell=args.gpus_per_cell or 0.0)
        check_device(ray, resolve_device(args.device))
        import_ray()  # missing: one error line naming the extra, before any work
    elif any(v is not None for v in (args.address, args.cpus_per_cell, args.gpus_per_cell)):
        raise SettingsError("--address, --cpus-per-cell and --gpus-per-cell need --executor ray")
    out = Path(args.out or f"runs/bench-{Path(args.grid).stem}")
    if args.pace_from and not args.plan:
        raise SettingsError("--pace-from needs --plan")
    for folder in args.pace_from or ():
        if not (read_all(Path(folder), "results") or read_all(Path(folder), "tuning")):
            raise SettingsError(f"--pace-from {folder}: no finished bench rows there")
    if args.plan:
        print_plan(plan(args.grid, out, args.rows, args.cells, args.pace_from or ()), out)
        return 0
    if args.render:
        if not out.is_dir():
            raise SettingsError(f"--render needs an existing bench folder; {out} is not one")
    else:
        failed_before = failed_runs(out)
        run_grid(args.grid, out, device=resolve_device(args.device), progress=not args.quiet,
                 phase=args.phase, shard=args.shard, ray=ray, only_rows=args.rows,
                 only_cells=args.cells)
        failed = failed_runs(out) - failed_before
        if failed:
            print(f"warning: {failed} run(s) failed twice; their errors are in "
                  f"{out / 'failed.jsonl'}, and running the grid again retries them",
                  file=sys.stderr)
            status = 1
    if (out / "tuning.json").exists():
        choice = json.loads((out / "tuning.json").read_text())
        table = (f"Rule: {choice['rule']}.\n\n" + tuning_table(choice["choice"]))
    elif grid.tuning is not None and read_all(out, "tuning"):
        # Unfinished: every candidate that has run so far; a defense is chosen for once all its
        # candidates have run (the others' runs cannot change its choice).
        choice = tuning_choice(grid, out)
        lines = summarise(tuning_rows(grid, out), grid.tuning)
        pending = {name: {"candidate": choice.get(name, {}).get("candidate"), "table": table}
                   for name, table in lines.items() if any(t["asrs"] for t in table)}
        waiting = [name for name in lines if name not in choice]
        table = (f"Tuning unfinished: a defense is chosen for once each of its candidates has "
                 f"run on every tuning model; {', '.join(waiting)} still wait, and their tuned "
                 f"rows with them. Rule: {grid.tuning.rule}.\n\n" + tuning_table(pending))
    else:
        table = ""
    if table:
        # Where each staged candidate (TSC's) removes the backdoor and loses its accuracy.
        table += stages_table(list(read_all(out, "tuning").values()))
        write_atomic(out / "tuning.md", table)
        print(table)
        print(f"tuning: {out / 'tuning.md'}")
    if args.phase == "tune":
        return status
    rows = finished_rows(args.grid, out)  # every finished row, earlier phases' included
    if not rows:  # e.g. a grid whose tuning alone has run so far
        print(f"no benchmark rows in {out} yet: nothing to tabulate beyond the tuning")
        return status
    table = markdown_table(rows)
    plots = plot_bench(rows, out / "plots")
    write_atomic(out / "results.md", table + "\n" + "\n".join(
        f"![{p.name}](plots/{p.name})" for p in plots) + "\n")
    print(table)
    print(f"results: {out / 'results.jsonl'}, table: {out / 'results.md'}, plots: {out / 'plots'}")
    return status


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _caused_by_interrupt(err: BaseException) -> bool:
    """Whether Ctrl-C (or SIGTERM) is what `err` wraps: Python 3.11 re-raises an interrupt that
    lands in a class definition's __set_name__ (a dataclass of a module imported lazily
    mid-run) as a RuntimeError from it, which would otherwise end in a traceback."""
    cause = err.__cause__
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            return True
        cause = cause.__cause__
    return False


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one `error:` line (exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def shipped_grids() -> list[str]:
    """The grids in tscpurify/bench/grids/, by name, for the help text."""
    return sorted(p.stem for p in (Path(__file__).parent / "bench" / "grids").glob("*.toml"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tscpurify",
        description="Remove backdoors from trained neural networks with TSC "
                    "(Two-stage Symmetry Connectivity).")
    parser.add_argument("--version", action="version", version=f"tscpurify {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    attack = commands.add_parser(
        "attack", help="train a backdoored model (for testing defenses)",
        description="Poison a training set, train a model on it, and write a run folder "
                    "(weights.safetensors, model.json, metrics.json).")
    add_attack_flags(attack)
    attack.add_argument("--out", required=True, help="run folder to create")
    attack.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_common(attack)
    attack.set_defaults(func=run_attack)

    encoder = commands.add_parser(
        "encoder", help="pre-train a SimCLR encoder, backdoored or not (for testing defenses)",
        description="Pre-train a SimCLR encoder on a sample of the training images, backdoored "
                    "by BadEncoder or CTRL (or clean), judge it with a linear probe on clean "
                    "labelled data, and write a run folder (weights.safetensors, model.json "
                    "with kind 'encoder', metrics.json with linear-probe ACC / ASR / RA and "
                    "kNN ACC). The defaults take a few CPU-minutes.")
    add_encoder_flags(encoder)
    encoder.add_argument("--out", required=True, help="run folder to create")
    encoder.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_common(encoder)
    encoder.set_defaults(func=run_encoder)

    evaluate = commands.add_parser(
        "evaluate", help="recompute ACC / ASR / RA of a run folder",
        description="Recompute clean accuracy (ACC), attack success rate (ASR) and robust "
                    "accuracy (RA) of a run folder on its data set's test split; for an "
                    "encoder, those of a linear probe trained on clean labelled data over its "
                    "frozen features (as its model.json records), plus kNN accuracy.")
    evaluate.add_argument("run", help="run folder (from `tscpurify attack`, `encoder` or "
                                      "`purify`)")
    evaluate.add_argument("--arch", default=None, metavar="MODULE:FUNCTION",
                          help="trust and import the architecture the run's model.json names, "
                               "for a model purified with --arch MODULE:FUNCTION")
    add_retune_flags(evaluate, default=False,
                     what="also re-tune the model (a classifier whose attack is recorded)")
    add_common(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    purify = commands.add_parser(
        "purify", help="remove a backdoor from a run folder's model with TSC",
        description="Purify the model of a run folder with TSC on a clean subset of its training "
                    "split; writes the purified run folder with report.json, report.md and "
                    "plots/. An encoder run folder is purified without labels (SimCLR loss on "
                    "the clean images alone) and judged before and after by a linear probe.")
    purify.add_argument("run", nargs="?", default=None,
                        help="run folder of the suspect model (or --weights, below)")
    purify.add_argument("--out", required=True, help="purified run folder to create")
    own = purify.add_argument_group(
        "a model trained elsewhere (instead of a run folder; docs/run-folder.md)")
    own.add_argument("--weights", default=None, metavar="FILE",
                     help="its weights: .safetensors (or .pt, loaded with weights_only=True)")
    own.add_argument("--arch", default=None, metavar="NAME|MODULE:FUNCTION",
                     help="a registered model (e.g. preactresnet18) or your own factory, e.g. "
                          "mymodels:make_net, imported from the current folder or PYTHONPATH "
                          "and called with the --model-arg values; also needed for a run "
                          "folder whose model.json names such a factory")
    own.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                     help="keyword argument of the architecture (repeatable)")
    purify.add_argument("--leaf-module", action="append", metavar="PATH|CLASS",
                        help="a module the symmetry tracer keeps opaque (never permuted), by "
                             "path (features.3) or class name (DenseBlock), as a SpecError's "
                             "leaf_modules hint asks (repeatable)")
    own.add_argument("--data", default=None,
                     help="the data set it was trained on: fashion-mnist, cifar10 or folder")
    own.add_argument("--data-root", default=None,
                     help="folder of its files (cifar10: data_batch_*.bin; folder: train/ and "
                          "test/ with one sub-folder per class)")
    purify.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last finished stage")
    purify.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_purify_flags(purify)
    add_common(purify, device_and_seed=False)
    purify.set_defaults(func=run_purify)

    demo = commands.add_parser(
        "demo", help="attack → purify → evaluate → report on Fashion-MNIST (~6 min on 2 CPUs)",
        description="Train a BadNets-backdoored small CNN on Fashion-MNIST, purify it with TSC "
                    "on 5%% clean data, and write both run folders and the report under --out.")
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's runs")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    from .defenses.tsc import PRESETS

    # Checked by argparse: an unknown name met only at step 2 came after minutes of training.
    demo.add_argument("--preset", default="default", choices=sorted(PRESETS),
                      help=argparse.SUPPRESS)
    add_common(demo)
    demo.set_defaults(func=run_demo)

    bench = commands.add_parser(
        "bench", help="run a grid of attacks × models × defenses × seeds",
        description="Run a benchmark grid (a TOML file, or a shipped grid: "
                    f"{', '.join(shipped_grids())}). Finished cells are skipped, so an "
                    "interrupted run resumes where it stopped; "
                    "backdoored models are cached and shared between defenses. Writes "
                    "results.jsonl, results.md (ACC / ASR / RA / DER) and plots/.")
    bench.add_argument("grid", help="grid TOML file, or a shipped grid's name")
    bench.add_argument("--out", default=None, help="output folder (default: runs/bench-GRID)")
    bench.add_argument("--phase", choices=("all", "tune", "default", "tuned"), default="all",
                       help="what to run: the tuning candidates only ('tune'), the published-"
                            "default rows, the tuned rows (tuning first if unfinished), or all")
    bench.add_argument("--shard", default=None, metavar="I/N",
                       help="run every N-th run of the phase only (I from 0), e.g. two "
                            "processes with 0/2 and 1/2; each writes its own results file and "
                            "the tables merge them")
    bench.add_argument("--rows", default=None, metavar="ROW,...",
                       help="run only these rows of the grid (its defenses, variants or "
                            "reference rows, by name), e.g. sau,ibau; the rest waits for a "
                            "later run or another machine, and the tables merge them")
    bench.add_argument("--cells", default=None, metavar="ATTACK:MODEL:SEED,...",
                       help="run only these cells of the grid, named as its tables name them, "
                            "e.g. badnets:cnn:0 (tuning models included)")
    bench.add_argument("--executor", choices=("serial", "ray"), default="serial",
                       help="where the runs execute: one after another in this process, or as "
                            "Ray tasks (pip install 'tscpurify[ray]'); the rows are the same "
                            "(default: serial)")
    bench.add_argument("--address", default=None,
                       help="ray: a running cluster to join, e.g. auto or ray://HOST:10001 "
                            "(default: start a local one on this machine)")
    bench.add_argument("--cpus-per-cell", type=finite_float, default=None, metavar="N",
                       help="ray: CPUs reserved for each run, and its torch threads (default: 1)")
    bench.add_argument("--gpus-per-cell", type=finite_float, default=None, metavar="G",
                       help="ray: GPUs reserved for each run; with --device cuda (default: 0)")
    bench.add_argument("--pace-from", action="append", default=None, metavar="FOLDER",
                       help="with --plan: also time rows not yet run from the finished rows of "
                            "this bench folder (another grid's, on this machine); repeatable")
    bench.add_argument("--plan", action="store_true",
                       help="run nothing: list the models to train and the runs done and "
                            "left per part and row, and the hours left at the pace of this "
                            "folder's finished runs")
    bench.add_argument("--render", action="store_true",
                       help="run nothing: write the tables and plots of the rows finished so far "
                            "(e.g. while another process runs the grid)")
    add_common(bench)
    bench.set_defaults(func=run_bench)
    return parser


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A warning as the CLI shows it: one line, no source location."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad flag (2, after its one error line)
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # A polite kill (SIGTERM) unwinds like Ctrl-C, so temporary folders and locks are removed
    # and purify says where its finished stages are kept.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    shown, warnings.showwarning = warnings.showwarning, _warning_line
    try:
        if hasattr(args, "seed"):
            from .job import JobSettings
            from .seeding import seed_everything

            # purify's generated --seed is None when unset: JobSettings' default then
            seed_everything(JobSettings().seed if args.seed is None else args.seed)
        return args.func(args)
    except TscpurifyError as err:
        hint = (" (on the command line: --leaf-module PATH or --leaf-module CLASS)"
                if isinstance(err, SpecError) and "leaf_modules=" in str(err) else "")
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder, a vanished file: the user's
        print(f"error: {err.strerror or err}"
              + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not _caused_by_interrupt(err):
            raise  # a bug: its traceback
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
