"""--device cuda end to end. Skipped without a CUDA GPU; `scripts/gpu-check.sh` runs them on
a machine that has one (this project's CI machine has none)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tscpurify import TSCSettings, purify
from tscpurify.cli import main
from tscpurify.models import create_model
from tscpurify.settings import replace_settings

from .test_cli import PURIFY_TINY, TINY

ROOT = Path(__file__).parents[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_attack_purify_evaluate_on_cuda(fmnist_root, tmp_path):
    run, out = tmp_path / "bd", tmp_path / "clean"
    assert main(["attack", "--data-root", str(fmnist_root), "--out", str(run), "--device",
                 "cuda", "--attack-arg", "size=4", *TINY]) == 0
    assert main(["purify", str(run), "--out", str(out), "--device", "cuda", *PURIFY_TINY]) == 0
    weights = load_file(str(out / "weights.safetensors"))
    assert all(t.device.type == "cpu" for t in weights.values())  # saved portable
    assert main(["evaluate", str(out), "--device", "cuda"]) == 0
    assert json.loads((out / "report.json").read_text())["environment"]["device"] == "cuda"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("bf16", [False, True])
def test_purify_keeps_a_cuda_model_on_cuda(bf16):
    from torch.utils.data import DataLoader, TensorDataset

    model = create_model("cnn", width=4).cuda()
    data = TensorDataset(torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    settings = replace_settings(TSCSettings(), rounds=1, epochs=1, ft_epochs=0,
                                final_ft_epochs=1, profile_points=0, bf16=bf16)
    purified, _ = purify(model, DataLoader(data, batch_size=32), settings, progress=False)
    assert all(p.device.type == "cuda" and p.dtype == torch.float32
               for p in purified.parameters())


def test_the_gpu_timing_script_runs(tmp_path):
    """scripts/gpu_timing.py on the CPU at toy size: the script a GPU machine runs works."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_timing.py"), "--device",
                           "cpu", "--width", "4", "--images", "64", "--epochs", "1", "--bf16"],
                          capture_output=True, text=True, timeout=300, check=True)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("| cpu (bf16) | 4 | 64 | 9 |")


def test_the_step_time_script_runs(monkeypatch, capsys):
    """scripts/step_time.py at toy size, in this process: the cost estimate users run works."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["step_time.py", "cnn:width=4", "mlp", "--batch-size", "8",
                                      "--repeats", "1"])
    before = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "scripts" / "step_time.py"), run_name="__main__")
    finally:
        torch.set_num_threads(before)  # the script sets its own thread count
    out = capsys.readouterr().out
    assert "| cnn:width=4 |" in out and "| mlp |" in out
