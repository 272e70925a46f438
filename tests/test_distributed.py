"""Distributed TSC (tscpurify.distributed, docs/scaling.md): two gloo processes on the CPU.

- The pieces: the all-reduced curve gradient equals the single-process gradient over the
  union batch (atol 1e-6), and so do a whole curve training, BatchNorm re-estimation and the
  activation-matching correlations over shards.
- A purification on two processes equals one on one process with the same global batch, on a
  BN-free MLP with a loss without augmentation: those are the two things that legitimately
  differ between the runs (measured: 4e-9 at most; asserted: 1e-6). With BatchNorm, a training
  step normalises with each process's own half batch (as under DistributedDataParallel), and
  each process augments its own shard with its own random draws, so a CNN's result is a
  different, equally valid sample, not the same numbers.
- `torchrun --nproc_per_node 2 -m tscpurify purify RUN --out X` writes exactly one run folder.

The workers are module-level functions (torch.multiprocessing.spawn imports this module in
each child); they meet through a file store, so no port is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tscpurify import distributed as dist
from tscpurify.curve import BezierCurve, CurveSettings, recompute_bn_stats, train_curve
from tscpurify.curve.train import cross_entropy_loss
from tscpurify.defenses.tsc import TSCSettings, purify
from tscpurify.errors import OutputError, TscpurifyError
from tscpurify.models import create_model
from tscpurify.permutation import derive_spec
from tscpurify.permutation.match import correlations
from tscpurify.settings import replace_settings

from .test_cli import backdoored_run  # noqa: F401 - a fixture

SIZE, CLASSES = 8, 4
L2 = CurveSettings(epochs=2, lr=0.05, l2_reg=1e-2, cosine_t_max=None)


def data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, SIZE, SIZE, generator=g),
                         torch.randint(0, CLASSES, (n,), generator=g))


def mlp() -> nn.Module:
    return create_model("mlp", num_classes=CLASSES, image_size=SIZE, hidden=(8, 8))


def cnn() -> nn.Module:
    return create_model("cnn", num_classes=CLASSES, width=4, image_size=SIZE)


def seeded(build, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build().eval()


def union_loader(dataset: TensorDataset, global_batch: int, seed: int) -> DataLoader:
    """One process's view of the data in a sharded run: with one process, its shard is the
    whole permutation, in global batches."""
    sampler = dist.ShardSampler(dataset, 1, 0, seed)
    return DataLoader(dataset, batch_size=global_batch, sampler=sampler)


def spawn(worker, world: int, tmp_path: Path, *args) -> list[dict]:
    """Run worker(*args) on `world` processes of one gloo group; their results."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(worker, world, str(tmp_path / "store"), str(tmp_path), *args),
             nprocs=world, join=True)
    # plain containers of tensors, numbers and strings: loadable without unpickling code
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _entry(rank: int, worker, world: int, store: str, out: str, *args) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                  world_size=world)
    try:
        result = worker(*args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


# --- the pieces ------------------------------------------------------------------------------
def _pieces() -> dict:
    rank, world = dist.rank(), dist.world_size()
    dataset, results = data(), {}

    # 1. One gradient: each process its half of a batch of 16, the same t.
    start, end, mid = (seeded(mlp, s).state_dict() for s in (1, 2, 3))
    params = {k for k, _ in mlp().named_parameters()}
    x, y = dataset.tensors[0][:16], dataset.tensors[1][:16]

    def gradient(images, labels, reduce):
        curve = BezierCurve(mlp(), start, end, {k: mid[k] for k in params})
        weights = curve.weights(0.3)
        loss = F.cross_entropy(curve.as_function(0.3, weights)(images), labels)
        loss = loss + 0.5 * L2.l2_reg * torch.stack([w.square().sum()
                                                     for w in weights.values()]).sum()
        loss.backward()
        grads = list(curve.parameters())
        if reduce:
            dist.all_reduce_gradients(grads)
        return [g.grad.clone() for g in grads]

    results["grad"] = gradient(x[rank::world], y[rank::world], reduce=True)
    results["grad_union"] = gradient(x, y, reduce=False)

    # 2. A whole curve training (2 epochs of 6 steps) over shards and over the union batches.
    loss_fn = cross_entropy_loss(None)

    def trained(loader, distributed):
        curve = BezierCurve(mlp(), start, end, {k: mid[k] for k in params})
        train_curve(curve, loader, loss_fn, L2, progress=False, distributed=distributed,
                    generator=torch.Generator().manual_seed(7))
        return {k: v.detach().clone() for k, v in curve.named_parameters()}

    results["curve"] = trained(dist.sharded(DataLoader(dataset), 8, seed=5), True)
    results["curve_union"] = trained(union_loader(dataset, 8, seed=5), False)

    # 3. BatchNorm re-estimation of a CNN over shards (batches of 16 in all).
    model = seeded(cnn, 4)
    recompute_bn_stats(model, dist.sharded(DataLoader(dataset), 16, seed=6), distributed=True)
    results["bn"] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    recompute_bn_stats(model, union_loader(dataset, 16, seed=6))
    results["bn_union"] = {k: v.clone() for k, v in model.state_dict().items()
                           if "running" in k}

    # 4. The activation-matching correlations of two CNNs over shards.
    a, b = seeded(cnn, 8), seeded(cnn, 9)
    spec = derive_spec(a, dataset.tensors[0][:2])
    results["corr"] = correlations(a, b, spec, dist.sharded(DataLoader(dataset), 8, seed=2),
                                   distributed=True)
    results["corr_union"] = correlations(a, b, spec, union_loader(dataset, 8, seed=2))

    # 5. A refusal on rank 0 (an existing --out, say) stops every process, none waits.
    def refuse():
        raise OutputError("--out exists")

    try:
        dist.on_main(refuse)
    except TscpurifyError as err:
        results["refusal"] = f"{type(err).__name__}: {err}"
    return results


def test_all_reduced_gradients_and_statistics_equal_the_union_batch(tmp_path):
    results = spawn(_pieces, 2, tmp_path)
    for result in results:
        for grad, union in zip(result["grad"], result["grad_union"], strict=True):
            torch.testing.assert_close(grad, union, rtol=0, atol=1e-6)
        for key, union in result["curve_union"].items():
            torch.testing.assert_close(result["curve"][key], union, rtol=0, atol=1e-6)
        for key, union in result["bn_union"].items():
            torch.testing.assert_close(result["bn"][key], union, rtol=1e-5, atol=1e-6)
        for key, union in result["corr_union"].items():
            torch.testing.assert_close(result["corr"][key], union, rtol=0, atol=1e-6)
    assert [r["refusal"] for r in results] == [
        "OutputError: --out exists", "DistributedError: rank 0 stopped: OutputError: --out exists"]


def test_helpers_are_no_ops_without_a_process_group():
    tensor = torch.ones(3)
    assert dist.all_reduce_sum(tensor) is tensor and torch.equal(tensor, torch.ones(3))
    assert dist.world_size() == 1 and dist.is_main() and not dist.active()
    assert dist.on_main(lambda: 5) == 5


# --- a whole purification ----------------------------------------------------------------------
# One round, one fine-tune after it; a loss without augmentation, batches of 16 in all.
TINY = replace_settings(TSCSettings(), rounds=1, epochs=2, lr=0.05, profile_points=0,
                        final_ft_epochs=1, batch_size=None)


def _purify(resume_dir: str | None) -> dict:
    def run():
        return purify(seeded(mlp, 11), DataLoader(data(), batch_size=16), TINY,
                      loss_fn=cross_entropy_loss(None), seed=3, progress=False,
                      distributed=True, resume_dir=resume_dir)

    purified, report = run()
    result = {"state": purified.state_dict(), "report": asdict(report)}
    if resume_dir is not None:  # every stage is finished: rank 0 reads them, all follow
        result["resumed"] = run()[0].state_dict()
    return result


def test_a_purification_on_two_processes_equals_one_on_one(tmp_path):
    two = spawn(_purify, 2, tmp_path / "two", str(tmp_path / "two" / "stages"))
    one = spawn(_purify, 1, tmp_path / "one", None)[0]
    assert (tmp_path / "two" / "stages" / "round0_stage2.json").exists()
    for key, value in one["state"].items():
        # the two processes hold the very same weights
        assert torch.equal(two[0]["state"][key], two[1]["state"][key]), key
        torch.testing.assert_close(two[0]["state"][key], value, rtol=0, atol=1e-6)
    assert two[0]["report"] == two[1]["report"]  # rank 0's report on both
    for result in two:
        for key, value in result["resumed"].items():
            assert torch.equal(value, two[0]["state"][key]), key


# --- the command line under torchrun ------------------------------------------------------------
def test_torchrun_purify_writes_one_run_folder(backdoored_run, tmp_path):  # noqa: F811
    out = tmp_path / "purified"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tscpurify", "purify", str(backdoored_run), "--out", str(out), "--device", "cpu",
         "--rounds", "1", "--epochs", "1", "--final-ft-epochs", "1", "--profile-points", "0",
         "--clean-fraction", "0.2", "--batch-size", "32", "--no-retune", "--quiet",
         "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["purified"]  # no stages, no temp
    assert {"model.json", "weights.safetensors", "report.json"} <= {p.name
                                                                     for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["processes"] == 2
    assert result.stdout.count("ACC") <= 1  # one summary, rank 0's


def test_the_timing_script_runs(tmp_path):
    """scripts/distributed_timing.py at toy size on the CPU: 1 and 2 processes, one table."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "distributed_timing.py"
    done = subprocess.run(
        [sys.executable, str(script), "--processes", "1", "2", "--width", "2", "--images", "32",
         "--epochs", "1", "--batch-size", "16"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert [row["processes"] for row in rows] == [1, 2]
    assert rows[0]["steps"] == rows[1]["steps"]  # the same work on either count
