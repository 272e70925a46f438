"""Time TSC's default on PreAct-ResNet18 and CIFAR-10-shaped data, against one plain SGD step.

    python scripts/gpu_timing.py --device cuda            # full width 64, 2,500 images (5%)
    python scripts/gpu_timing.py --device cpu --width 4 --images 64 --epochs 1   # a smoke run

Prints one table row: the planned steps, the measured seconds of one SGD step of the model at
batch 256 (t_step, median of 20 after 5 warm-up steps), TSC's total seconds, and their ratio
TSC / (steps × t_step), which docs/scaling.md puts at 1.16-1.32 on CPU. The data are random
images: time does not depend on their content.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from tscpurify import TSCSettings, purify
from tscpurify.bench.timing import step_seconds, synchronize
from tscpurify.models import create_model
from tscpurify.settings import replace_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=64, help="PreAct-ResNet18 width (64: full)")
    parser.add_argument("--images", type=int, default=2500, help="clean images (5%% of CIFAR-10)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="curve epochs (default: TSC's default, 30); smaller for a smoke run")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast in the curves and fine-tunes (CurveSettings.bf16); "
                             "t_step stays float32's")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.images, 3, 32, 32)
    y = torch.randint(0, 10, (args.images,))
    loader = DataLoader(TensorDataset(x, y), batch_size=256, shuffle=True)
    model = create_model("preactresnet18", in_channels=3, width=args.width).to(args.device)
    settings = TSCSettings(profile_points=0)
    if args.epochs is not None:
        settings = replace_settings(TSCSettings(), profile_points=0, epochs=args.epochs,
                                    ft_epochs=1, final_ft_epochs=1)
    settings = replace_settings(settings, bf16=args.bf16)
    steps = settings.planned_steps(len(loader))
    t_step = step_seconds(create_model("preactresnet18", in_channels=3, width=args.width)
                          .to(args.device).train(), (x[:256], y[:256]), args.device)
    synchronize(args.device)
    began = time.perf_counter()
    purify(model, loader, settings, progress=False)
    synchronize(args.device)
    total = time.perf_counter() - began
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    name += " (bf16)" if args.bf16 else ""
    print("| device | width | images | steps | t_step (s) | TSC (s) | TSC / (steps × t_step) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {name} | {args.width} | {args.images} | {steps} | {t_step:.4f} | {total:.1f} | "
          f"{total / (steps * t_step):.2f} |")


if __name__ == "__main__":
    main()
