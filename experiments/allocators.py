"""The allocator setting of CPU runs measured: ``python -m experiments.allocators``.

    python -m experiments.allocators [--rounds 3] [--steps 5] [--width 1.0] [--batch 32]

Each allocator runs in its own fresh process (an allocator is chosen when a process starts),
the processes interleaved over ``--rounds`` (the order reversed every other round), each timing
``--steps`` natural and bare-IBP steps of CNN-7 at CIFAR shapes with one torch thread:

* ``glibc``: the C library's default (large freed blocks go back to the kernel every step;
  allocator variables of the calling shell, e.g. ``LD_PRELOAD`` or ``GLIBC_TUNABLES``, are not
  passed on to any of the processes);
* ``mallopt``: :func:`fastcert.memory.keep_freed_memory`, fastcert's default on CPU;
* ``jemalloc``: ``LD_PRELOAD`` of libjemalloc with ``MALLOC_CONF=dirty_decay_ms:-1,
  muzzy_decay_ms:-1`` (never return freed pages), where the library is installed.

Prints per allocator and step: wall time (median / min), CPU time, minor page faults per step
(``getrusage``), and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
            "/usr/lib/libjemalloc.so.2")
STEPS = ("natural", "ibp")


def child(mode: str, steps: int, width: float, batch: int) -> dict:
    """In a fresh process: time ``steps`` of each step type; faults and peak RSS."""
    import resource
    import time
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    if mode == "mallopt":
        from fastcert.memory import keep_freed_memory

        assert keep_freed_memory()
    from fastcert.bounds import Bound, BoundedNet, robust_ce_from_margins
    from fastcert.config import build_option

    torch.manual_seed(0)
    model = build_option("model", "cnn7", {"width": width}, input_shape=(3, 32, 32),
                         num_classes=10)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    net = BoundedNet(model, x[:2], 10).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    lower, upper = (x - 2 / 255).clamp(0, 1), (x + 2 / 255).clamp(0, 1)

    def natural():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def ibp():
        logits, lb = net.margin_bounds(x, y, lower, upper, Bound.IBP)
        loss = F.cross_entropy(logits, y) + robust_ce_from_margins(lb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {}
    for name, fn in zip(STEPS, (natural, ibp)):
        fn()  # warm-up
        wall, cpu, faults = [], [], []
        for _ in range(steps):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        out[name] = {"wall": wall, "cpu": cpu, "faults": faults}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _allocator_free_env() -> dict:
    """This process's environment without allocator settings (``LD_PRELOAD``, jemalloc's
    ``MALLOC_CONF``, glibc's ``GLIBC_TUNABLES`` and ``MALLOC_*_`` variables), so that
    ``glibc`` is the C library's default whatever the shell had set."""
    return {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}


def _spawn(mode: str, args) -> dict:
    env = dict(_allocator_free_env(), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if mode == "jemalloc":
        env["LD_PRELOAD"] = next(p for p in JEMALLOC if os.path.exists(p))
        env["MALLOC_CONF"] = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    code = ("import json, sys; from experiments.allocators import child; "
            f"print('JSON' + json.dumps(child({mode!r}, {args.steps}, {args.width}, "
            f"{args.batch})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("JSON")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode}: {proc.stderr[-2000:]}")
    return json.loads(lines[0][4:])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.allocators", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per step type and round")
    p.add_argument("--width", type=float, default=1.0, help="CNN-7 width factor")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    modes = ["glibc", "mallopt"] + (["jemalloc"] if any(map(os.path.exists, JEMALLOC)) else [])
    runs = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes if r % 2 == 0 else modes[::-1]:
            runs[m].append(_spawn(m, args))
    summary = {}
    print(f"CNN-7 (width {args.width}), batch {args.batch}, 1 thread; {args.rounds} rounds × "
          f"{args.steps} steps, each allocator in its own process\n")
    print("| allocator | step | wall s (median / min) | CPU s (median) | minor faults / step "
          "(median) | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        for step in STEPS:
            wall = [t for r in runs[m] for t in r[step]["wall"]]
            cpu = [t for r in runs[m] for t in r[step]["cpu"]]
            faults = [f for r in runs[m] for f in r[step]["faults"]]
            peak = max(r["peak_rss_mb"] for r in runs[m])
            summary[f"{m}/{step}"] = {"wall_median": statistics.median(wall), "wall_min": min(wall),
                                      "cpu_median": statistics.median(cpu),
                                      "faults_median": statistics.median(faults),
                                      "peak_rss_mb": peak}
            print(f"| {m} | {step} | {statistics.median(wall):.3f} / {min(wall):.3f} | "
                  f"{statistics.median(cpu):.3f} | {int(statistics.median(faults))} | {peak:.0f} |")
    return summary


if __name__ == "__main__":
    main()
