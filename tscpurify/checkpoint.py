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
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError
from .models import create_model
from .models.factory import build_from_factory, is_factory_path
from .sidecar import SIDECAR, Sidecar, parse_sidecar

WEIGHTS = "weights.safetensors"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# A sidecar is a few kilobytes; more is not one (and is never read whole into memory).
MAX_JSON_BYTES = 16 * 2**20


def read_json(path: Path) -> Any:
    # A run folder may come from anyone: its model.json may be a FIFO (a read that never
    # returns) or a link to /dev/zero (one that never ends), so only a regular file, bounded.
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; not a "
                                  f"tscpurify sidecar")
        return json.loads(raw.decode())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # binary garbage is not UTF-8
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def check_readable(path: Path) -> None:
    """A weights file must be a readable file. Checked here because the loaders misreport it:
    safetensors calls an unreadable file "No such file or directory" and a folder "No such
    device", and torch.load's failure would read as a pickle refused."""
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is not a file")
    with open(path, "rb"):  # PermissionError: the CLI's one line naming the file
        pass


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or from `.pt`/`.pth` with weights_only=True."""
    path = Path(path)
    check_readable(path)
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


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """The tensor shapes a safetensors file declares in its header, read without loading any
    tensor (None for other formats)."""
    if path.suffix != ".safetensors":
        return None
    check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors' error class moved between releases
        raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from None


def check_shapes(expected: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                 source: str) -> None:
    """Names and shapes of a checkpoint against a model's state dict, one-line error."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the architecture: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in expected.items():
        if tuple(value.shape) != tuple(shapes[key]):
            raise CheckpointError(f"{source} does not match the architecture: {key} has shape "
                                  f"{tuple(shapes[key])}, the model expects "
                                  f"{tuple(value.shape)}")


def check_values(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every parameter must be a finite floating-point tensor: a NaN model would otherwise
    evaluate as a plausible-looking 10% accuracy and 100% ASR."""
    floating = {name for name, _ in model.named_parameters()}
    floating |= {name for name, b in model.named_buffers() if b.is_floating_point()}
    for key in floating & set(state):
        value = state[key]
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: {key} holds {value.dtype} values where the model "
                                  f"has floating-point weights")
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values")


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly, with a one-line error naming the first mismatch."""
    own = model.state_dict()
    check_shapes(own, {k: tuple(v.shape) for k, v in state.items()}, source)
    check_values(model, state, source)
    model.load_state_dict(state)


def save_model(model: nn.Module, folder: Path, sidecar: Sidecar) -> None:
    """Write weights.safetensors and model.json into `folder` (which must exist)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    write_json(folder / SIDECAR, sidecar.to_json())


def read_sidecar(folder: str | Path) -> Sidecar:
    """A run folder's model.json, parsed and checked, without loading its weights."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise CheckpointError(f"run folder {folder} {what}")
    return parse_sidecar(read_json(folder / SIDECAR), folder / SIDECAR)


def build_model(arch: str, kwargs: dict[str, Any], trusted_arch: str | None = None,
                 source: str = "model.json") -> nn.Module:
    """A registered model, or the user's own factory ('module:function', models/factory.py)
    when the user named it: `trusted_arch` must equal `arch`, since importing runs code."""
    if trusted_arch is not None and trusted_arch != arch:
        # --arch only vouches for the code a run names; it never replaces what the run was
        # saved as (the weights fit that), so a different one is a mistake to report.
        raise CheckpointError(f"{source} names the architecture {arch!r}, but --arch "
                              f"{trusted_arch} was given; drop --arch, or pass --arch {arch}")
    if not is_factory_path(arch):
        return create_model(arch, **kwargs)
    if trusted_arch != arch:
        raise CheckpointError(f"{source} names the importable architecture {arch!r}; code a "
                              f"file names is never imported on its own: pass --arch {arch} "
                              f"(trusted_arch= in Python) to build it")
    return build_from_factory(arch, **kwargs)


def load_model(folder: str | Path, device: str | torch.device = "cpu",
               trusted_arch: str | None = None) -> tuple[nn.Module, Sidecar]:
    """Rebuild a saved model from its run folder: architecture from the sidecar, then weights.
    A sidecar naming an importable factory needs the same name in `trusted_arch`."""
    folder = Path(folder)
    sidecar = read_sidecar(folder)
    arch, kwargs = sidecar.arch, sidecar.kwargs
    source = str(folder / SIDECAR)
    # The sidecar alone must not decide an allocation: build the model on the meta device
    # (no memory) and compare it with the shapes the weights file declares first.
    with torch.device("meta"):
        skeleton = build_model(arch, kwargs, trusted_arch, source)
    shapes = weight_shapes(folder / WEIGHTS)
    if shapes is not None:
        check_shapes(skeleton.state_dict(), shapes, str(folder / WEIGHTS))
    model = build_model(arch, kwargs, trusted_arch, source)
    load_state_into(model, load_weights(folder / WEIGHTS), str(folder / WEIGHTS))
    return model.to(device).eval(), sidecar
