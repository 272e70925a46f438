"""Models on disk: safetensors weights + a JSON sidecar (run folders are written atomically by
`outputs.atomic_folder`).

Models come from untrusted sources, so nothing here unpickles: safetensors is plain tensors,
and a `.pt` file is accepted only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError
from .models import MODELS, create_model

SIDECAR_FORMAT = "tscpurify-model/1"
WEIGHTS = "weights.safetensors"
SIDECAR = "model.json"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or from `.pt`/`.pth` with weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors' error class moved between releases
            raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
            raise CheckpointError(
                f"refusing {path}: it is not a plain tensor checkpoint loadable with "
                f"weights_only=True ({type(err).__name__}); convert it to safetensors") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise CheckpointError(f"{path} does not hold a state dict of tensors")
        return state
    raise CheckpointError(f"unsupported weights format {path.suffix!r}: use .safetensors "
                          f"(or .pt loaded with weights_only=True)")


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly, with a one-line error naming the first mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the architecture: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in own.items():
        if value.shape != state[key].shape:
            raise CheckpointError(f"{source} does not match the architecture: {key} has shape "
                                  f"{tuple(state[key].shape)}, the model expects "
                                  f"{tuple(value.shape)}")
    model.load_state_dict(state)


def save_model(model: nn.Module, folder: Path, sidecar: dict[str, Any]) -> None:
    """Write weights.safetensors and model.json into `folder` (which must exist)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    write_json(folder / SIDECAR, {"format": SIDECAR_FORMAT, **sidecar})


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved model from its run folder: architecture from the sidecar, then weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"run folder {folder} does not exist")
    sidecar = read_json(folder / SIDECAR)
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{folder / SIDECAR} is not a {SIDECAR_FORMAT} sidecar")
    arch = sidecar.get("arch")
    if arch not in MODELS:
        raise CheckpointError(f"{folder / SIDECAR} names unknown architecture {arch!r}")
    model = create_model(arch, **sidecar.get("kwargs", {}))
    load_state_into(model, load_weights(folder / WEIGHTS), str(folder / WEIGHTS))
    return model.to(device).eval(), sidecar
