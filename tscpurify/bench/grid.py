"""`tscpurify bench`: a grid of attacks × models × seeds × defenses from a TOML file.

Plan:
  1. read the grid (TOML) into a Grid; every table key is checked before anything trains;
  2. tuning (when the grid has a [tuning] section): run every defense's candidate settings on
     the tuning models, pick one per defense by the written rule (`tuning.choose`), and write
     the choice to `tuned.toml` in the output folder; a defense whose candidates have all run
     is chosen for at once (its choice reads its own candidates alone), so its tuned rows
     can run while the others' tuning goes on;
  3. run the benchmark cells (seed by seed, `seed_major`), once with each defense's published
     defaults ("default" rows) and once with the tuned choice ("tuned" rows), every training
     defense resized to the grid's step budget; a backdoored model is trained once (cached)
     and shared by every defense;
  4. evaluate each purified model on the test split, and re-tune it on a few poisoned samples
     (`tscpurify.retune`) to see whether the backdoor stays gone; append one JSON line per
     cell (crash-safe, so a resumed run skips exactly the finished cells);
  5. render results.md and plots from the JSON lines alone.

Rows are named by the grid's defense names: a registered defense, a [variants.NAME] (a
registered defense with fixed overrides, e.g. TSC without its permutation), or one of two
references that are not defenses: "none" (the backdoored model as it is) and "clean_floor"
(the same architecture trained without poison: the floor of the re-tune column).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..attacks import ATTACKS, create_attack
from ..data import CLEAN_FRACTION, load_dataset, select_clean_subset
from ..data.images import dataset_key
from ..data.subset import subset_kind
from ..defenses import DEFENSES, defend
from ..defenses.budget import at_budget, planned_steps
from ..errors import CheckpointError, DataError, SettingsError
from ..evaluation import Metrics, der, evaluate
from ..job import AUTO_DEVICE, resolve_device
from ..models import MODELS
from ..outputs import check_resumable_out, output_lock, write_atomic
from ..permutation import model_distances
from ..retune import RetuneSettings, retune_profile
from ..runs import load_run
from ..seeding import derive_seed
from ..settings import replace_settings, settings_hash
from ..training import TrainSettings
from ..version import __version__
from .cache import cached_backdoored, cached_folder, run_metrics
from .executors import RayOptions, check_device, run_ray, run_serial
from .tuning import FLOOR, TuningSpec, choose, parse_tuning, write_tuned

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GRIDS = Path(__file__).parent / "grids"
REFERENCES = ("none", "clean_floor")  # rows that run no defense
DATA_KEYS = {"name", "root", "clean_fraction", "batch_size"}
TOP_KEYS = {"seeds", "attacks", "defenses", "budget_steps", "settings", "data", "models",
            "attack_args", "defense_args", "variants", "retune", "tuning"}
SETTINGS_ROWS = ("default", "tuned")
PHASES = ("all", "tune", "default", "tuned")
TRAIN_EPOCHS = TrainSettings().epochs  # a grid model's training epochs unless it says


@dataclass(frozen=True)
class Cell:
    """One run: a defense (or reference row) on one backdoored model, with final settings."""

    attack: str
    model: str
    seed: int
    defense: str  # the row's name: a defense, a variant or a reference row
    base: str = ""  # the registered defense that runs ("" for reference rows)
    attack_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    train_epochs: int = TRAIN_EPOCHS
    train_args: dict[str, Any] = field(default_factory=dict)  # other TrainSettings of the model
    defense_args: dict[str, Any] = field(default_factory=dict)
    data: str = "fashion-mnist"
    data_root: str | None = None
    clean_fraction: float = CLEAN_FRACTION
    batch_size: int = 256
    budget_steps: int | None = None
    retune: dict[str, Any] | None = None  # RetuneSettings as a dict; None = no re-tune column
    setting: str = "default"  # "default", "tuned", or a tuning candidate's name
    # The grid's names of the model and attack entries when they are aliases of registered
    # ones ([models.cnn_w32] arch = "cnn"; [attack_args.badnets_r01] attack = "badnets"):
    # labels in tables, never part of what runs ("" = the registered name itself).
    model_label: str = ""
    attack_label: str = ""

    @property
    def name(self) -> str:
        """The cell as tables and --cells name it, aliases as the grid has them: badnets:cnn:120."""
        return f"{self.attack_label or self.attack}:{self.model_name}:{self.seed}"

    @property
    def model_name(self) -> str:
        """The model entry as the grid names it: `cnn_w32` for an alias of `cnn` at width 32."""
        return self.model_label or self.model

    @property
    def key(self) -> str:
        """Everything that decides the result, and nothing else: two rows that run the same
        thing (a tuned choice equal to the default, say) share one run."""
        fields = asdict(self)
        for label in ("setting", "model_label", "attack_label"):
            fields.pop(label)
        if not self.train_args:  # keys of rows made before models could set their training
            fields.pop("train_args")
        if self.base:  # a reference row ("none", "clean_floor") is told apart by its name only
            fields.pop("defense")
        return settings_hash(fields)


@dataclass(frozen=True)
class Grid:
    cells: list[Cell]  # the benchmark cells, default rows then tuned rows as asked
    tuning: TuningSpec | None
    tuning_cells: list[Cell]  # every candidate on every tuning model
    # Per row: (settings every run of it takes, a variant's own overrides, which win over a
    # tuned choice: TSC without its permutation stays without it).
    row_args: dict[str, tuple[dict[str, Any], dict[str, Any]]]

    def tuned(self, cell: Cell, choice: dict[str, dict[str, Any]]) -> Cell:
        """A tuned row's cell with the chosen candidate's settings (its choice must be made:
        `pending`)."""
        target = self.tuning.tuned_as.get(cell.defense, "") if self.tuning else ""
        if cell.setting != "tuned" or not target:
            return cell
        fixed, overrides = self.row_args[cell.defense]
        args = {**fixed, **choice[target]["overrides"], **overrides}
        return dataclasses.replace(cell, defense_args=args)

    def pending(self, cell: Cell, choice: dict[str, dict[str, Any]]) -> bool:
        """Whether the cell is a tuned row whose defense's tuning has not chosen yet."""
        target = self.tuning.tuned_as.get(cell.defense, "") if self.tuning else ""
        return cell.setting == "tuned" and bool(target) and target not in choice

    def chosen(self, cells: list[Cell], choice: dict[str, dict[str, Any]]) -> list[Cell]:
        """The cells as they run under `choice`: tuned rows with their chosen settings, those
        still waiting for their tuning left out."""
        return [self.tuned(c, choice) for c in cells if not self.pending(c, choice)]


@dataclass(frozen=True)
class Selection:
    """What of a grid to run (`bench --rows`, `--cells`): rows by their names in the grid, cells
    as `attack:model:seed`; None = all. A selection runs the same cells, with the same keys, as
    the whole grid, so its rows count for the grid, and the rest runs later or elsewhere."""

    rows: frozenset[str] | None = None
    cells: frozenset[str] | None = None

    @classmethod
    def parse(cls, rows: str | None, cells: str | None, grid: Grid) -> Selection:
        """From the flags' comma lists, each name checked against `grid` before any work."""
        def names(text: str | None, known: list[str], flag: str) -> frozenset[str] | None:
            if text is None:
                return None
            given = [n.strip() for n in text.split(",") if n.strip()]
            unknown = [n for n in given if n not in known]
            if not given or unknown:
                raise SettingsError(f"{flag}: {', '.join(unknown) or repr(text)} is not one of "
                                    f"this grid's; choices: {', '.join(dict.fromkeys(known))}")
            return frozenset(given)
        every = [*grid.cells, *grid.tuning_cells]
        return cls(names(rows, [c.defense for c in every], "--rows"),
                   names(cells, [c.name for c in every], "--cells"))

    def __contains__(self, cell: Cell) -> bool:
        return ((self.rows is None or cell.defense in self.rows)
                and (self.cells is None or cell.name in self.cells))


def _require(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SettingsError(f"grid: {what} must be a {names}, got {value!r}")
    return value


def model_arch(name: str, config: dict[str, Any]) -> str:
    """The registered model a [models.NAME] entry builds: its `arch`, or NAME itself. An alias
    lets one grid hold the same architecture at several sizes (the width study)."""
    arch = _require(config.get("arch", name), str, f"[models.{name}] arch")
    MODELS.get(arch)  # an unknown name fails now, with the registered ones listed
    return arch


def model_training(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """A [models.NAME] entry's `train` table: TrainSettings besides the epochs (e.g. a ViT's
    optimizer = "adamw"), checked now."""
    train = dict(_require(config.get("train", {}), dict, f"[models.{name}.train]"))
    if "epochs" in train:
        raise SettingsError(f"grid: [models.{name}] sets its training epochs as epochs = N, "
                            f"not in its train table")
    try:
        replace_settings(TrainSettings(), **train)
    except SettingsError as err:
        raise SettingsError(f"grid: [models.{name}.train]: {err}") from None
    return train


def attack_entries(table: dict[str, Any]) -> tuple[dict[str, dict[str, Any]],
                                                     Callable[[str], str]]:
    """[attack_args] as {entry: arguments} and a function from an entry's name to its
    registered attack: an entry may be an alias with `attack = "badnets"` (the poisoning-rate
    study runs BadNets at three rates as three entries)."""
    arguments, bases = {}, {}
    for name, spec in table.items():
        spec = dict(_require(spec, dict, f"[attack_args.{name}]"))
        bases[name] = _require(spec.pop("attack", name), str, f"[attack_args.{name}] attack")
        arguments[name] = spec
    return arguments, lambda name: bases.get(name, name)


def _check_settings(base: str, args: dict[str, Any], what: str) -> None:
    """Fail on an unknown or invalid setting now, not after a model has trained."""
    cls = DEFENSES.meta[DEFENSES.name_of(base)]["settings"]
    try:
        replace_settings(cls(), **args)
    except SettingsError as err:
        raise SettingsError(f"grid: {what}: {err}") from None


def read_grid(source: str | Path) -> Grid:
    """The grid in a TOML file, or a shipped grid by name (`tscpurify/bench/grids/*.toml`)."""
    path = Path(source)
    if not path.exists() and (GRIDS / f"{source}.toml").exists():
        path = GRIDS / f"{source}.toml"
    if not path.exists():
        shipped = ", ".join(p.stem for p in sorted(GRIDS.glob("*.toml")))
        raise SettingsError(f"no grid {source!r}: give a TOML file or one of: {shipped}")
    try:
        grid = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SettingsError(f"{path} is not valid TOML: {err}") from None
    if not grid:  # an empty (or truncated) file would run the default grid, hours of work
        raise SettingsError(f"grid {path} is empty; a grid lists at least its attacks, models "
                            f"and defenses (e.g. {GRIDS / 'quick.toml'})")
    unknown = sorted(set(grid) - TOP_KEYS)
    if unknown:
        raise SettingsError(f"grid {path}: unknown key(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(TOP_KEYS))}")

    data = _require(grid.get("data", {}), dict, "[data]")
    unknown = sorted(set(data) - DATA_KEYS)
    if unknown:  # a typo ("nmae") would otherwise run the default data set
        raise SettingsError(f"grid {path}: unknown key(s) in [data]: {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(DATA_KEYS))}")
    models = _require(grid.get("models", {"cnn": {"width": 16, "epochs": 5}}), dict, "[models]")
    seeds = _require(grid.get("seeds", [0]), list, "seeds")
    attacks = _require(grid.get("attacks", ["badnets"]), list, "attacks")
    names = _require(grid.get("defenses", ["ft", "tsc"]), list, "defenses")
    budget = grid.get("budget_steps")
    if budget is not None and (_require(budget, int, "budget_steps") < 1):
        raise SettingsError(f"grid: budget_steps must be ≥ 1, got {budget}")
    rows = tuple(_require(grid.get("settings", ["default"]), list, "settings"))
    if not rows or any(r not in SETTINGS_ROWS for r in rows):
        raise SettingsError(f"grid: settings must list some of {SETTINGS_ROWS}, got {rows}")
    defense_args = _require(grid.get("defense_args", {}), dict, "[defense_args]")
    variants = _require(grid.get("variants", {}), dict, "[variants]")
    retune = grid.get("retune")
    retune_dict = None
    if retune is not None:
        try:  # replace_settings names an unknown key or a mistyped value
            retune_dict = asdict(replace_settings(RetuneSettings(), **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in _require(retune, dict, "[retune]").items()}))
        except SettingsError as err:
            raise SettingsError(f"grid: [retune]: {err}") from None

    # What each row name runs: (registered defense, fixed overrides, tuned like which row).
    rows_of: dict[str, tuple[str, dict[str, Any], str | None]] = {}
    # A variant may also take its own share of clean data (the clean-data study of #21).
    row_data: dict[str, dict[str, Any]] = {}
    for name in names:
        _require(name, str, "a defense name")
        if name in REFERENCES:
            rows_of[name] = ("", {}, None)
        elif name in variants:
            spec = dict(_require(variants[name], dict, f"[variants.{name}]"))
            base = DEFENSES.name_of(_require(spec.pop("defense", None), str,
                                             f"[variants.{name}] defense"))
            tune_as = spec.pop("tune_as", None)
            if "clean_fraction" in spec:
                amount = _require(spec.pop("clean_fraction"), (int, float),
                                  f"[variants.{name}] clean_fraction")
                if amount <= 0:
                    raise SettingsError(f"grid: [variants.{name}] clean_fraction must be > 0 "
                                        f"(a fraction below 1, or a count), got {amount}")
                row_data[name] = {"clean_fraction": amount}
            if tune_as is not None and tune_as not in names:
                raise SettingsError(f"grid: [variants.{name}] tune_as {tune_as!r} is not a "
                                    f"defense of this grid")
            rows_of[name] = (base, spec, tune_as)
        else:
            rows_of[name] = (DEFENSES.name_of(name), {}, name)
    unused = sorted(set(variants) - set(names))
    if unused:  # most likely a row misspelt in `defenses`, which would then fail or run another
        raise SettingsError(f"grid: [variants.{unused[0]}] is not listed in defenses; list it "
                            f"there or remove the table")
    bases = {base for base, _, _ in rows_of.values() if base}
    for name, args in defense_args.items():  # a defense's args also reach its variants
        if name not in bases and not (name in rows_of and rows_of[name][0]):
            raise SettingsError(f"grid: [defense_args.{name}] names no defense of this grid")
        _require(args, dict, f"[defense_args.{name}]")
    row_args = {}
    for name, (base, overrides, _) in rows_of.items():
        fixed = {**defense_args.get(base, {}), **defense_args.get(name, {})} if base else {}
        row_args[name] = (fixed, overrides)
        if base:
            _check_settings(base, {**fixed, **overrides}, f"settings of {name!r}")

    def check_candidate(name: str, candidate: dict[str, Any]) -> None:
        fixed, overrides = row_args[name]
        _check_settings(rows_of[name][0], {**fixed, **candidate, **overrides},
                        f"a tuning candidate of {name!r}")

    tuning = None
    if "tuning" in grid:
        tuning = parse_tuning(grid["tuning"], {n: r[2] for n, r in rows_of.items()}, models,
                              seeds, check_candidate,
                              retune_dict["epochs"] if retune_dict is not None else None)
    if "tuned" in rows and tuning is None:
        raise SettingsError("grid: tuned rows need a [tuning] section")

    attack_args, attack_of = attack_entries(
        _require(grid.get("attack_args", {}), dict, "[attack_args]"))
    for model_cfg in models.values():  # unknown attacks fail now, not after hours of runs
        for attack in _require(model_cfg, dict, "[models.*]").get("attacks", attacks):
            ATTACKS.get(attack_of(_require(attack, str, "an attack name")))
    for name, arguments in attack_args.items():  # and their arguments' names and types
        try:
            create_attack(attack_of(name), **arguments)
        except SettingsError as err:
            raise SettingsError(f"grid: [attack_args.{name}]: {err}") from None
    data_name = _require(data.get("name", "fashion-mnist"), str, "data.name")
    try:  # before the bench folder is made: a refused grid leaves nothing behind
        dataset_key(data_name)
    except DataError as err:
        raise SettingsError(f"grid: [data] name: {err}") from None
    common = dict(data=data_name,
                  data_root=_require(data.get("root"), (str, type(None)), "data.root"),
                  clean_fraction=_require(data.get("clean_fraction", CLEAN_FRACTION), (int, float),
                                          "data.clean_fraction"),
                  batch_size=_require(data.get("batch_size", 256), int, "data.batch_size"),
                  budget_steps=budget)
    # Checked now, not when the first defense runs (after its backdoored model has trained);
    # a variant's own clean_fraction likewise.
    for amount in (common["clean_fraction"], *(d["clean_fraction"] for d in row_data.values())):
        subset_kind(amount)
    if common["batch_size"] < 1:
        raise SettingsError(f"grid: data.batch_size must be ≥ 1, got {common['batch_size']}")
    cells = []
    for setting in rows:
        for model, model_cfg in models.items():
            _require(model_cfg, dict, f"[models.{model}]")
            arch = model_arch(model, model_cfg)
            model_args = {k: v for k, v in model_cfg.items()
                          if k not in ("epochs", "attacks", "seeds", "arch", "train")}
            train_args = model_training(model, model_cfg)
            for attack in model_cfg.get("attacks", attacks):
                for seed in model_cfg.get("seeds", seeds):
                    _require(seed, int, "a seed")
                    for name, (base, _, _) in rows_of.items():
                        fixed, overrides = row_args[name]
                        cells.append(Cell(
                            attack=attack_of(attack), model=arch, seed=seed, defense=name,
                            base=base, attack_args=attack_args.get(attack, {}),
                            model_label=model if model != arch else "",
                            attack_label=attack if attack != attack_of(attack) else "",
                            model_args=model_args,
                            train_epochs=model_cfg.get("epochs", TRAIN_EPOCHS),
                            train_args=train_args,
                            defense_args={**fixed, **overrides}, retune=retune_dict,
                            setting=setting, **{**common, **row_data.get(name, {})}))
    tuning_cells = []
    if tuning is not None:
        model_cfg = models[tuning.model]
        model_args = {k: v for k, v in model_cfg.items()
                      if k not in ("epochs", "attacks", "seeds", "arch", "train")}
        # The deep rule re-tunes every candidate, and compares with each tuning model's floor.
        arch = model_arch(tuning.model, model_cfg)
        tuning_common = dict(model=arch, model_label=tuning.model if tuning.model != arch else "",
                             model_args=model_args,
                             train_epochs=model_cfg.get("epochs", TRAIN_EPOCHS),
                             train_args=model_training(tuning.model, model_cfg),
                             retune=retune_dict if tuning.deep else None, **common)
        if tuning.deep:
            tuning_cells += [Cell(attack=attack_of(attack), seed=seed, defense="clean_floor",
                                  attack_args=attack_args.get(attack, {}), setting=FLOOR,
                                  attack_label=attack if attack != attack_of(attack) else "",
                                  **tuning_common) for attack, seed in tuning.models]
        for name, listed in tuning.candidates.items():
            fixed, overrides = row_args[name]
            for candidate, chosen in listed.items():
                for attack, seed in tuning.models:
                    tuning_cells.append(Cell(
                        attack=attack_of(attack), seed=seed, defense=name,
                        base=rows_of[name][0], attack_args=attack_args.get(attack, {}),
                        attack_label=attack if attack != attack_of(attack) else "",
                        defense_args={**fixed, **chosen, **overrides}, setting=candidate,
                        **{**tuning_common, **row_data.get(name, {})}))
    if not cells:  # e.g. seeds = [] or attacks = []: a bench that would run nothing, silently
        raise SettingsError(f"grid {path} has no runs: its models, attacks, seeds and defenses "
                            f"must each list at least one")
    return Grid(cells, tuning, tuning_cells, row_args)


def result_files(out: Path, stem: str) -> list[Path]:
    """`stem`.jsonl and every shard's `stem`.shardIofN.jsonl in `out`."""
    return sorted(p for p in [out / f"{stem}.jsonl", *out.glob(f"{stem}.shard*.jsonl")]
                  if p.exists())


def read_all(out: Path, stem: str) -> dict[str, dict]:
    """Finished rows of every writer (shards included), by key."""
    rows: dict[str, dict] = {}
    for path in result_files(out, stem):
        rows.update(read_results(path))
    return rows


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' → (I, N) with 0 ≤ I < N; None stays None."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise SettingsError(f"--shard must look like I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= index < count:
        raise SettingsError(f"--shard I/N needs 0 ≤ I < N, got {text!r}")
    return index, count


def append_row(path: Path, row: dict) -> None:
    """One line per finished cell, so a crash loses at most the cell in progress; a line a
    crash cut short is closed first, so the new row does not join it."""
    with path.open("a+b") as handle:
        handle.seek(0, 2)
        if handle.tell():
            handle.seek(-1, 2)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write((json.dumps(row) + "\n").encode())


def read_results(path: Path) -> dict[str, dict]:
    """Finished rows by key. A line cut short by a crash is skipped (its cell runs again),
    with a warning; a last line without its newline is skipped quietly, as another process
    may be writing it right now (--render and --plan read while a grid runs)."""
    if not path.exists():
        return {}
    text = path.read_text()
    lines = text.split("\n")
    if lines[-1]:
        lines.pop()  # unterminated: being written, or cut by a crash (append_row closes it)
    rows = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[row["key"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            print(f"warning: {path}:{number} is not a result row; its cell will run again",
                  file=sys.stderr)
    return rows


def model_options(cell: Mapping[str, Any]) -> dict[str, Any]:
    """How the cell's models are trained, from a Cell's fields or a result row's `cell`."""
    train = replace_settings(TrainSettings(epochs=cell["train_epochs"]),
                             **(cell.get("train_args") or {}))
    return dict(model=cell["model"], seed=cell["seed"], train=train,
                model_args=cell.get("model_args") or {},
                data=cell.get("data", "fashion-mnist"), data_root=cell.get("data_root"))


def model_folders(cell: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Where the cell's models are cached in `out`/models, trained or not yet: "backdoored"
    and, for the clean_floor row, "clean" (from a Cell's fields or a result row's `cell`)."""
    options = model_options(cell)
    folders = {"backdoored": cached_folder(out / "models", attack=cell["attack"],
                                           attack_args=cell.get("attack_args") or {},
                                           **options)}
    if cell["defense"] == "clean_floor":
        folders["clean"] = cached_folder(out / "models", attack=None, **options)
    return folders


def backdoored_model(cell: Cell, out: Path, device: str, progress: bool = False) -> Path:
    """The cell's backdoored model (trained once, cached in `out`/models)."""
    return cached_backdoored(out / "models", attack=cell.attack, attack_args=cell.attack_args,
                             **model_options(asdict(cell)), device=device, progress=progress)


def clean_model(cell: Cell, out: Path, device: str, progress: bool = False) -> Path:
    """The same architecture and seed trained without poison: the re-tune floor."""
    return cached_backdoored(out / "models", attack=None, **model_options(asdict(cell)),
                             device=device, progress=progress)


def models_needed(cell: Cell) -> list[tuple[str, str]]:
    """(which, key) of the cached models the cell reads, "backdoored" and, for the clean_floor
    row, "clean": what a parallel executor trains once before the cells that share it."""
    shared = {k: v for k, v in asdict(cell).items()
              if k in ("model", "seed", "train_epochs", "model_args", "data", "data_root")
              or k == "train_args" and v}
    needed = [("backdoored", settings_hash({**shared, "attack": cell.attack,
                                            "attack_args": cell.attack_args}))]
    if cell.defense == "clean_floor":
        needed.append(("clean", settings_hash(shared)))
    return needed


def _models(cell: Cell, out: Path, device: str, progress: bool) -> tuple[Path, Path | None]:
    """The cell's backdoored model and, for the re-tune floor, its clean twin."""
    clean = clean_model(cell, out, device, progress) if cell.defense == "clean_floor" else None
    return backdoored_model(cell, out, device, progress), clean


def run_cell(cell: Cell, out: Path, device: str, progress: bool) -> dict:
    folder, clean_folder = _models(cell, out, device, progress)
    model, _, attack = load_run(folder, device)
    train = load_dataset(cell.data, "train", cell.data_root)
    test = load_dataset(cell.data, "test", cell.data_root)
    before = Metrics(**{k: v for k, v in run_metrics(folder).items() if k in ("acc", "asr", "ra")})
    settings, steps, seconds, stages, report = None, 0, 0.0, None, None
    suspect = model
    clean = train.subset(select_clean_subset(train.labels, cell.clean_fraction,
                                             derive_seed(cell.seed, "clean")))
    loader = DataLoader(clean.tensor_dataset(), batch_size=cell.batch_size, shuffle=True)
    if cell.base:
        settings_cls = DEFENSES.meta[cell.base]["settings"]
        settings = replace_settings(settings_cls(), **cell.defense_args)
        # A defense that re-batches (TSC) counts its budget in its own batches.
        own_batch = getattr(settings, "batch_size", None) or cell.batch_size
        batches = math.ceil(len(clean) / own_batch)
        settings = at_budget(settings, cell.budget_steps, batches)
        # Every defense saves its progress under partial/ (TSC each finished stage, the others
        # their last epoch, resume.py), so that a row cut short (a stopped session, a
        # lost worker) resumes where it was, with the same result; the folder goes once the
        # row is written (write_row).
        services = {"resume_dir": partial_folder(out, cell.key),
                    "resume_identity": {"cell": cell.key, "torch": torch.__version__,
                                        "threads": torch.get_num_threads()}}
        if cell.base == "tsc":
            # TSC records its stages (ACC / ASR at each curve point and after each fine-tune)
            # through the harness's evaluator: where the removal and the accuracy cost arise
            # (docs/ablations.md). TSC only calls it, undoes its random draws and books its
            # time apart, so the weights, steps and seconds are those of a run without it.
            services["evaluate"] = lambda m: evaluate(m, test, attack).as_dict()
        try:
            result = defend(cell.base, model, loader, settings, seed=cell.seed,
                            progress=progress, callbacks=services)
        except (SettingsError, CheckpointError):
            partial = partial_folder(out, cell.key)
            if not partial.exists():
                raise
            # Stages this row saved under other code or settings (TSC refuses to mix them in):
            # the bench's own scratch, so it starts the row over.
            shutil.rmtree(partial)
            result = defend(cell.base, model, loader, settings, seed=cell.seed,
                            progress=progress, callbacks=services)
        model, steps = result.model, result.steps
        # A resumed row's time: this run's, plus what its saved epochs took when they ran.
        seconds = (result.seconds.get("total", 0.0) + result.seconds.get("resumed", 0.0)
                   - result.seconds.get("caller_evaluation", 0.0))
        if "report" in result.details:
            report = result.details["report"]
            stages = [asdict(record) for record in report.stages]
            # A resumed row's time: this run's, plus what its loaded stages took when they ran.
            seconds += sum(sum(s["seconds"].values()) - s["seconds"].get("caller_evaluation", 0)
                           for s in stages if [s["round"], s["stage"]] in report.resumed)
        if steps != planned_steps(settings, batches):
            raise RuntimeError(f"{cell.base} took {steps} steps but planned "
                               f"{planned_steps(settings, batches)}")  # a bug, not user error
    elif cell.defense == "clean_floor":
        model, _, _ = load_run(clean_folder, device)
    after = evaluate(model, test, attack)
    # What a defender can see without the attack: how far the result moved from the suspect
    # model, in raw weights and once its units are aligned to the suspect's (permutation/).
    ordered = DataLoader(clean.tensor_dataset(), batch_size=cell.batch_size)
    distance = model_distances(suspect, model, ordered)
    row = {"key": cell.key, "cell": asdict(cell), "before": before.as_dict(),
           "after": after.as_dict(), "der": der(before, after), "steps": steps,
           "seconds": seconds, "settings": asdict(settings) if settings is not None else {},
           "distance": distance,
           **({"stages": stages} if stages is not None else {}),
           **({"resumed_stages": report.resumed} if stages is not None and report.resumed
              else {}),
           **({"resumed_seconds": result.seconds["resumed"]}
              if cell.base and "resumed" in result.seconds else {}),
           # Floating-point sums, and so results, depend on these: recorded with every row.
           "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "tool_version": __version__}
    if cell.retune is not None:
        retune = RetuneSettings(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in cell.retune.items()})
        row["retune"] = retune_profile(model, train, test, attack, retune,
                                       seed=derive_seed(cell.seed, "retune"))
    return row


def partial_folder(out: Path, key: str) -> Path:
    """Where a row's defense keeps its finished stages until the row is written."""
    return out / "partial" / key


def write_row(path: Path, out: Path, row: dict) -> None:
    """Append a finished row, then drop the stages it was resumable from."""
    append_row(path, row)
    shutil.rmtree(partial_folder(out, row["key"]), ignore_errors=True)


def seed_major(cells: list[Cell]) -> list[Cell]:
    """`cells` in the order they run: seed by seed, each (model, attack) with all its rows, its
    default rows before its tuned ones. A grid cut short then has every attack at the first
    seed rather than every seed of the first attack, and each finished cell has all its rows."""
    models = {m: i for i, m in enumerate(dict.fromkeys(c.model for c in cells))}
    attacks = {a: i for i, a in enumerate(dict.fromkeys(c.attack for c in cells))}
    return sorted(cells, key=lambda c: (c.seed, models[c.model], attacks[c.attack]))


def _run_cells(cells: list[Cell], out: Path, stem: str, device: str, progress: bool,
               desc: str, shard: tuple[int, int] | None = None,
               order: Callable[[list[Cell]], list[Cell]] = list,
               ray: RayOptions | None = None, only: Selection = Selection()) -> list[dict]:
    """Run the unfinished cells of `only` in `order` (of this shard: every N-th distinct run, so
    the shards share each cell's rows) on this process, or on Ray when `ray` is given
    (executors.py); return every finished row of `cells`, in their order."""
    path = out / (f"{stem}.jsonl" if shard is None else f"{stem}.shard{shard[0]}of{shard[1]}.jsonl")
    running = [c for c in order(cells) if c in only]
    keys = list(dict.fromkeys(c.key for c in running))
    mine = set(keys if shard is None else keys[shard[0]::shard[1]])
    # One writer per results file: a second process writing the same file is refused (the
    # tuning, the benchmark rows and each shard write their own, so they may run side by side).
    with output_lock(path):
        finished = read_all(out, stem)
        # One entry per distinct run still to do, so the bar counts real work (a resumed grid
        # starts at 0 of what is left, not at 0 of everything).
        todo: dict[str, Cell] = {}
        for cell in running:
            if cell.key in mine and cell.key not in finished:
                todo.setdefault(cell.key, cell)
        if ray is None:
            # Re-read before each run: another shard may have finished this key meanwhile.
            run_serial(todo.values(), lambda cell: run_cell(cell, out, device, progress=False),
                       lambda key: key in read_all(out, stem),
                       lambda row: write_row(path, out, row), progress, desc)
        else:
            run_ray(todo.values(), out, device, lambda row: write_row(path, out, row), ray,
                    progress, desc, models_needed)
    done = read_all(out, stem)
    # Rows carry their own labels: a shared run appears under every row that asked for it.
    return [{**done[c.key], "cell": asdict(c)} for c in cells if c.key in done]


def run_tuning(grid: Grid, out: Path, device: str = "cpu", progress: bool = True,
               shard: tuple[int, int] | None = None, ray: RayOptions | None = None,
               only: Selection = Selection()) -> dict[str, dict[str, Any]]:
    """Run every candidate (of `only`) on the tuning models; return the choice of every tuned
    row whose candidates have all run (`tuning_choice`), and once all have, write it
    (tuned.toml, and tuning.json with the table behind each choice)."""
    if grid.tuning is None:
        raise SettingsError("this grid has no [tuning] section")
    if any(c in only for c in grid.tuning_cells):
        rows = _run_cells(grid.tuning_cells, out, "tuning", device, progress, "tuning", shard,
                          ray=ray, only=only)
    else:
        # No candidate selected (e.g. `--cells` of benchmark cells only): read the tuning, do
        # not lock its file, so that its own process may go on writing it meanwhile.
        rows = tuning_rows(grid, out)
    if len(rows) < len(grid.tuning_cells):
        # Sharded, selected, or runs failed: the rows whose candidates have all run choose.
        return choose(rows, grid.tuning, partial=True)
    choice = choose(rows, grid.tuning)
    write_tuned(out / "tuned.toml", choice, grid.tuning)
    write_atomic(out / "tuning.json", json.dumps(
        {"rule": grid.tuning.rule, "models": grid.tuning.models, "choice": choice}, indent=1))
    return choice


def tuning_choice(grid: Grid, out: Path) -> dict[str, dict[str, Any]]:
    """The tuning's choice so far: the whole of it once written (tuning.json), else that of
    each tuned row whose candidates have all run on every tuning model (a row's choice reads
    its own candidates alone, so it does not change when the others finish); {} without
    tuning."""
    if grid.tuning is None:
        return {}
    if (out / "tuning.json").exists():
        return json.loads((out / "tuning.json").read_text())["choice"]
    return choose(tuning_rows(grid, out), grid.tuning, partial=True)


def tuning_rows(grid: Grid, out: Path) -> list[dict]:
    """The finished tuning runs, one per candidate and tuning model, each labelled as its
    candidate (a run two candidates share appears under both)."""
    done = read_all(out, "tuning")
    return [{**done[c.key], "cell": asdict(c)} for c in grid.tuning_cells if c.key in done]


def run_grid(source: str | Path, out: str | Path, *, device: str = AUTO_DEVICE,
             progress: bool = True, phase: str = "all", shard: str | None = None,
             ray: RayOptions | None = None, only_rows: str | None = None,
             only_cells: str | None = None) -> list[dict]:
    """Run every unfinished cell of `phase` ('tune', 'default', 'tuned' or 'all'); returns the
    benchmark rows of the phases run, in grid order. `shard` 'I/N' runs every N-th run only,
    so N processes (or machines sharing the folder) split a grid; each writes its own file.
    `only_rows` and `only_cells` (comma lists: Selection) run only those rows and cells of the grid.
    `ray` runs the cells as tasks on a Ray cluster instead of in this process (executors.py)."""
    if phase not in PHASES:
        raise SettingsError(f"unknown phase {phase!r}; choices: {', '.join(PHASES)}")
    part = parse_shard(shard)
    device = resolve_device(device)
    if ray is not None:
        check_device(ray, device)
    grid = read_grid(source)
    only = Selection.parse(only_rows, only_cells, grid)
    out = check_resumable_out(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "bench.json").exists():
        # Marks the folder as a bench's from the start, so that one stopped before its first
        # row (models trained, stages saved) is still resumed, not refused as foreign.
        write_atomic(out / "bench.json", json.dumps({"grid": str(source),
                                                     "tool_version": __version__}) + "\n")
    cells = grid.cells
    if grid.tuning is not None and phase in ("tune", "tuned", "all"):
        choice = run_tuning(grid, out, device, progress, part, ray, only)
        if phase == "tune":
            return []
        waiting = sorted({grid.tuning.tuned_as[c.defense] for c in cells
                          if c in only and grid.pending(c, choice)})
        if waiting and phase == "tuned" and not any(
                c.setting == "tuned" and c in only and not grid.pending(c, choice)
                for c in cells):
            raise SettingsError(f"the tuning of {', '.join(waiting)} is unfinished (other "
                                f"shards or --rows/--cells parts still have candidates to run, "
                                f"or some failed: see failed.jsonl); its tuned rows run once "
                                f"every candidate has a row")
        if waiting:
            print(f"note: the tuned rows of {', '.join(waiting)} wait for their tuning; the "
                  f"rest run", file=sys.stderr)
        cells = grid.chosen(cells, choice)
    if phase == "tune":
        return []
    wanted = {"default": ("default",), "tuned": ("tuned",), "all": SETTINGS_ROWS}[phase]
    cells = [c for c in cells if c.setting in wanted]
    return _run_cells(cells, out, "results", device, progress, "bench", part, seed_major, ray,
                      only)


def finished_rows(source: str | Path, out: str | Path) -> list[dict]:
    """Every benchmark row of the grid that has a result in `out`, in grid order: default
    rows, and tuned rows once the tuning has chosen."""
    grid, out = read_grid(source), Path(out)
    done = read_all(out, "results")
    cells = grid.chosen(grid.cells, tuning_choice(grid, out))
    return [{**done[c.key], "cell": asdict(c)} for c in cells if c.key in done]
