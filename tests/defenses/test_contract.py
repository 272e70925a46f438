"""The contract every registered defense keeps, run over the registry (new defenses included)."""

import argparse
import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader

from tscpurify.bench.grid import GRIDS, read_grid
from tscpurify.defenses import DEFENSES, defend
from tscpurify.models import create_model
from tscpurify.settings import add_settings_flags, settings_from_args

from .conftest import CLASSES, SIZE, snapshot

# A few seconds in total: the smallest budget at which each defense does everything it does.
TINY = {
    "anp": dict(iterations=3),
    "clp": {},
    "distill": dict(epochs=1),
    "fine_pruning": dict(epochs=1),
    "fst": dict(epochs=1),
    "ft": dict(epochs=1),
    "ft_sam": dict(epochs=1),
    "ibau": dict(rounds=1, inner_passes=1),
    "mcr": dict(ft_epochs=1, epochs=1),
    "nad": dict(teacher_epochs=1, epochs=1),
    "sau": dict(epochs=1, pgd_steps=1),
    "tsc": dict(rounds=1, epochs=1, final_ft_epochs=0, profile_points=0),
}


def test_every_registered_defense_has_a_tiny_budget_here():
    assert sorted(TINY) == DEFENSES.names()


def hooks(model):
    found = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            found.append(name)
    found += [n for n, p in model.named_parameters() if p._backward_hooks]
    return found


@pytest.mark.parametrize("name", sorted(TINY))
def test_defend_never_mutates_its_input_and_is_seeded(name, trained_cnn, band_data):
    loader = DataLoader(band_data, batch_size=32, shuffle=True)  # shuffled by the seeded RNG
    before = snapshot(trained_cnn)
    grad_flags = [p.requires_grad for p in trained_cnn.parameters()]
    result = defend(name, trained_cnn, loader, progress=False, seed=7, **TINY[name])

    for key, value in trained_cnn.state_dict().items():
        assert torch.equal(value, before[key]), f"{name} changed the input's {key}"
    assert [p.requires_grad for p in trained_cnn.parameters()] == grad_flags
    assert [p.requires_grad for p in result.model.parameters()] == grad_flags
    assert not trained_cnn.training and not hooks(trained_cnn) and not hooks(result.model)
    assert result.model is not trained_cnn and not result.model.training
    inputs = {p.data_ptr() for p in trained_cnn.parameters()}
    assert not inputs & {p.data_ptr() for p in result.model.parameters()}
    assert result.seconds["total"] > 0

    again = defend(name, trained_cnn, DataLoader(band_data, batch_size=32, shuffle=True),
                   progress=False, seed=7, **TINY[name])
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), f"{name} is not seeded: {key}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_settings_are_frozen_documented_and_round_trip_through_cli_flags(name):
    cls = DEFENSES.meta[name]["settings"]
    default = cls()
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), name
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, cls)
    assert settings_from_args(cls, parser.parse_args([])) == default
    module = DEFENSES.get(name).__module__
    assert module.rsplit(".", 1)[-1] in (name, "finetune"), "registry name = module name"


# Every architecture the shipped grids defend, at a size that runs in about a second. A grid
# row that crashes on its architecture costs the hours spent before it; this catches it here.
TINY_MODELS = {
    "cnn": dict(width=4, image_size=SIZE),
    "preactresnet18": dict(width=2),
    "vit": dict(image_size=SIZE, patch=4, dim=8, heads=2, depth=1),
}


def shipped_pairs() -> list[tuple[str, str]]:
    """(architecture, defense) of every training row and tuning candidate of the shipped grids,
    but the CNN's, which the contract tests above run."""
    pairs = set()
    for path in sorted(GRIDS.glob("*.toml")):
        grid = read_grid(path)
        pairs |= {(c.model, c.base) for c in [*grid.cells, *grid.tuning_cells] if c.base}
    return sorted(p for p in pairs if p[0] != "cnn")


def test_every_shipped_architecture_has_a_tiny_size_here():
    assert {arch for arch, _ in shipped_pairs()} <= set(TINY_MODELS)


@pytest.mark.parametrize("arch,name", shipped_pairs())
def test_each_defense_runs_on_each_architecture_a_shipped_grid_gives_it(arch, name, band_data):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=CLASSES, in_channels=1, **TINY_MODELS[arch]).eval()
    loader = DataLoader(band_data, batch_size=32, shuffle=True)
    result = defend(name, model, loader, progress=False, seed=7, **TINY[name])
    images = band_data.tensors[0][:8]
    with torch.no_grad():
        assert result.model(images).shape == (8, CLASSES)
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values()
               if v.is_floating_point()), f"{name} on {arch} left non-finite weights"
