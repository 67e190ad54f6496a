"""Time one training step per method: natural, IBP, CROWN-IBP (loss fusion) and fast IBP.

    python -m experiments.bench [--model cnn7] [--batch 32] [--steps 5] [--device auto]

CNN-7 (full BN) on CIFAR-shaped random data, in the ramp phase (ε = ε_target/2, so the warmup
regularisers and the CROWN-IBP/IBP mix are active). Prints the median step time of each method
and its ratio to natural training, and the overhead of the fast method over vanilla IBP (Shi et
al. 2021, Sec. 4.3 / Table 3 report 9-13%). Speed goals live here, never in unit tests.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from fastcert.bounds import BoundedNet
from fastcert.config import build_option
from fastcert.methods import Batch
from fastcert.pipeline import resolve_device

METHODS = ["natural", "ibp", "crown_ibp", "fast"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(name, model_name, batch, steps, device, eps=8 / 255, seed=0):
    torch.manual_seed(seed)
    model = build_option("model", model_name, input_shape=(3, 32, 32), num_classes=10)
    build_option("init", "ibp" if name == "fast" else "default")(model, seed=seed)
    model.to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    net = BoundedNet(model, x[:2], 10).train()
    method = build_option("method", name)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    step_batch = Batch(x, y, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), eps / 2, eps)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):  # the first step warms up (lazy loss-fusion graph, allocator)
        _sync(device)
        t0 = time.perf_counter()
        out = method.step(net, step_batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn7")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (median)")
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--out", default="bench_results", help="folder for bench.json")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = resolve_device(args.device)
    rows = {}
    for name in args.methods:
        rows[name] = time_method(name, args.model, args.batch, args.steps, device)
        print(f"  {name:<10} {rows[name][0]:8.3f} s/step", flush=True)
    base = rows.get("natural", (None,))[0]
    print(f"\n{args.model}, batch {args.batch}, {device}, median of {args.steps} steps\n")
    print("| method | s/step | × natural | peak GPU MiB |\n|---|---|---|---|")
    for name, (t, peak) in rows.items():
        ratio = f"{t / base:.2f}" if base else "-"
        print(f"| {name} | {t:.4f} | {ratio} | {peak:.0f} |" if peak is not None
              else f"| {name} | {t:.4f} | {ratio} | - |")
    result = {"model": args.model, "batch": args.batch, "device": str(device),
              "steps": args.steps, "seconds_per_step": {k: v[0] for k, v in rows.items()},
              "peak_gpu_mib": {k: v[1] for k, v in rows.items()}}
    if "ibp" in rows and "fast" in rows:
        overhead = rows["fast"][0] / rows["ibp"][0] - 1
        result["fast_overhead_over_ibp"] = overhead
        verdict = "within" if overhead <= 0.15 else "ABOVE"
        print(f"\nfast IBP overhead over vanilla IBP: {100 * overhead:+.1f}% ({verdict} the 15% "
              f"goal; Shi et al. 2021 report 9-13%)")
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
