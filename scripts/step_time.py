"""One SGD step of registered models at a batch size, timed, and each relative to the first:
what a purification will cost (docs/scaling.md: time ≈ 1.25 × steps × t_step).

    python scripts/step_time.py cnn:width=16 cnn:width=32 preactresnet18:width=16
    python scripts/step_time.py preactresnet18 --channels 3 --size 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch


def parse_model(text: str) -> tuple[str, dict]:
    """'cnn:width=32,image_size=28' → ('cnn', {'width': 32, 'image_size': 28})."""
    name, _, args = text.partition(":")
    kwargs = {}
    for pair in filter(None, args.split(",")):
        key, _, value = pair.partition("=")
        kwargs[key] = json.loads(value)
    return name, kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="NAME[:KEY=VALUE,...], a registered model")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true",
                        help="weights and inputs in channels-last memory layout (an open lead "
                             "for CPU speed: docs/scaling.md)")
    args = parser.parse_args()

    from tscpurify.bench.timing import step_seconds
    from tscpurify.models import MODELS, create_model
    from tscpurify.runs import model_kwargs

    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch_size, args.channels, args.size, args.size, device=args.device)
    y = torch.randint(0, args.classes, (args.batch_size,), device=args.device)
    # model_kwargs sizes a registered model to a data set's classes and image shape
    shape = SimpleNamespace(num_classes=args.classes, shape=(args.channels, args.size, args.size))
    first = None
    print(f"batch {args.batch_size}, {args.channels}×{args.size}×{args.size}, "
          f"{args.threads} thread(s), {args.device}, torch {torch.__version__}"
          f"{', channels-last' if args.channels_last else ''}\n")
    print("| model | seconds a step | relative |\n|---|---|---|")
    for text in args.models:
        name, extra = parse_model(text)
        MODELS.get(name)
        model = create_model(name, **model_kwargs(name, shape, extra)).to(args.device)
        inputs = x
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        seconds = step_seconds(model, (inputs, y), args.device, repeats=args.repeats, warmup=1)
        first = first or seconds
        print(f"| {text} | {seconds:.3f} | {seconds / first:.1f} |")


if __name__ == "__main__":
    main()
