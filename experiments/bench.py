"""Speed of one training step per method against its floor: ``make bench`` (issue #14).

    python -m experiments.bench [--device auto|cpu|cuda] [--batch N] [--reps 7] [--quick]

Every row trains the same model (CNN-7, full BN, CIFAR shapes; batch 32 on the CPU, 128 on a
GPU) on one batch of random images at ε = ε_target/2 (the ramp's midpoint, where the warmup
regularisers and CROWN-IBP's β mix are active), in one process, the rows interleaved: each
repetition times one step of every row, in alternating order. Rows:

* ``torch natural``: plain PyTorch: forward, cross entropy, backward, Adam step.
* ``floor ibp``: a bare auto_LiRPA IBP step written here (the floor of the IBP family):
  clean CE + IBP robust CE of the margins through a BoundedModule, backward, Adam step.
* ``floor loss fusion``: a bare auto_LiRPA loss-fusion step (Xu et al. 2020) with the bound of
  fastcert's CROWN-IBP at this ε: natural CE and the upper bound of the CE, β·CROWN-IBP +
  (1-β)·IBP, β = 1 - ε/ε_target; backward, Adam step.
* ``fit <method>`` for every ``conf/method`` option but :data:`experiments.EXPENSIVE_METHODS`:
  the real training step, i.e. the loop of :func:`fastcert.train.fit` (box, Batch,
  ``method.step``, backward, gradient clipping, Adam, per-step statistics) over a loader that
  repeats the batch; a step is the time between two batches the loop asks for. The first
  step of each call (a diagnostic step with a fresh optimiser) is not timed; the loader
  reports a CIFAR-10 epoch's length, so the diagnostic cadence is a real epoch's.

Each row: median and min over ``--reps`` repetitions (wall clock; on the CPU also CPU time),
ratios to ``torch natural`` and to its floor, and peak memory: max_memory_allocated on a GPU;
on the CPU the peak RSS of a process that runs only that row (one fresh process per row).
Goals (issue #14): ``fit natural`` <= 1.05x torch natural, the IBP-family steps <= 1.05x the
IBP floor, CROWN-IBP loss fusion <= 1.1x the bare loss-fusion step.

On a GPU (or with ``--phases`` / ``--fit-check``) it also reports s/epoch in each ε phase for
IBP, CROWN-IBP and fast on CNN-7 with CIFAR-10's 50k images (batches drawn and augmented on
the device; the columns of Table 3 of Shi et al. 2021, 30.0 / 54.8 / 64.0 / 78.5 s/epoch on a
2080 Ti), and whether one fast-IBP step of the TinyImageNet ResNeXt fits at batch 128.
``--quick``: a tiny CNN-7 at batch 4, 2 repetitions (the test suite's setting).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from experiments import default_methods
from experiments.bench_rows import (
    CIFAR_TRAIN,
    FitRow,
    Setting,
    build_row,
    cifar_box,
    fresh_model,
    quiet,
    random_batch,
    row_names,
    time_row,
)
from fastcert.bounds import BoundedNet
from fastcert.data import CropFlip, DeviceBatches
from fastcert.devices import acquire_device
from fastcert.memory import keep_freed_memory
from fastcert.schedules import PHASES

#: (row, floor row, goal ratio) checked in the report; other methods get ratios only
GOALS = {"fit natural": ("torch natural", 1.05), "fit ibp": ("floor ibp", 1.05),
         "fit fast": ("floor ibp", 1.05), "fit crown_ibp": ("floor loss fusion", 1.10)}

#: Table 3 of Shi et al. 2021 (s/epoch, CNN-7, CIFAR-10, one RTX 2080 Ti): method -> phase
TABLE3 = {"ibp": {"eps0": 30.0, "ramp": 54.8, "final": 54.8},
          "crown_ibp": {"eps0": 30.0, "ramp": 78.5, "final": 54.8},
          "fast": {"eps0": 64.0, "ramp": 64.0, "final": 54.8}}


# --------------------------------------------------------------------------- timing


def interleaved(names, s: Setting, reps: int, run_dir: Path) -> dict:
    """{row: {"wall": [...], "cpu": [...]}}: ``reps`` timed steps per row after one warm-up
    repetition, rows in alternating order."""
    shared: dict = {}
    rows = {n: build_row(n, s, run_dir, shared) for n in names}
    out = {n: {"wall": [], "cpu": []} for n in names}
    for rep in range(reps + 1):
        order = names if rep % 2 == 0 else names[::-1]
        for n in order:
            wall, cpu = time_row(rows[n])
            if rep:
                out[n]["wall"].append(wall)
                if s.device.type == "cpu":
                    out[n]["cpu"].append(cpu)
        print(f"  repetition {rep}/{reps} done", file=sys.stderr, flush=True)
    if s.device.type == "cuda":
        for n, row in rows.items():  # peak memory of one more step of each row
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(s.device)
            time_row(row)
            out[n]["peak_mib"] = torch.cuda.max_memory_allocated(s.device) / 2**20
    return out


# --------------------------------------------------------------------------- CPU memory


def rss_of_row(name: str, s: Setting, run_dir: Path) -> float:
    """Peak RSS (MiB) of a process that runs only the row ``name``: a child forked from this
    one (before any row is built here; it inherits the imports) builds the row and runs two
    steps."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(read)
            with quiet():
                row = build_row(name, s, run_dir, {})
                for _ in range(2):
                    time_row(row)
            os.write(write, str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if status or not text:
        raise RuntimeError(f"the memory run of {name!r} failed (status {status})")
    return int(text) / 1024


# --------------------------------------------------------------------------- GPU reports


def phase_table(s: Setting, reps: int, run_dir: Path, n_train: int = CIFAR_TRAIN,
                methods=("ibp", "crown_ibp", "fast")) -> dict:
    """s/epoch of each method in each ε phase: the median step of fit over batches drawn and
    augmented on the device from ``n_train`` CIFAR-shaped images (random crop 4 + flip),
    times the batches of an epoch."""
    g = torch.Generator().manual_seed(0)
    box = cifar_box()
    xs = box.from_pixels(torch.rand(n_train, *s.input_shape, generator=g)).to(s.device)
    ys = torch.randint(0, s.num_classes, (n_train,), generator=g).to(s.device)
    data = DeviceBatches(xs, ys, s.batch, shuffle=True,
                         generator=torch.Generator().manual_seed(0), augment=CropFlip(4, 0.5))
    steps_per_epoch = len(data)
    out = {}
    for method in methods:
        for phase, eps in (("eps0", 0.0), ("ramp", s.eps), ("final", s.eps_target)):
            net = BoundedNet(fresh_model(s), xs[:2], s.num_classes).train()
            row = FitRow(method, net, xs[:2], ys[:2], box, eps, s.eps_target,
                         run_dir / f"{method}-{phase}", timed=reps, length=steps_per_epoch,
                         source=lambda: iter(data))
            times = row.run()
            out.setdefault(method, {})[phase] = statistics.median(times) * steps_per_epoch
            del net, row
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def fits_step(s: Setting, run_dir: Path, model: str = "resnext", model_options=None,
              input_shape=(3, 64, 64), num_classes=200, method: str = "fast") -> dict:
    """Whether one ``method`` training step of ``model`` on TinyImageNet shapes fits (no
    out-of-memory error), and its peak memory on a GPU."""
    t = Setting(model, dict(model_options or {}), input_shape, num_classes, s.batch,
                s.eps_target, s.device)
    try:
        x, y, box = random_batch(t)
        net = BoundedNet(fresh_model(t), x[:2], num_classes).train()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(s.device)
        FitRow(method, net, x, y, box, t.eps, t.eps_target, run_dir / "fit-check").run()
    except torch.OutOfMemoryError as e:
        return {"model": model, "batch": s.batch, "fits": False, "error": str(e).splitlines()[0]}
    peak = torch.cuda.max_memory_allocated(s.device) / 2**20 if s.device.type == "cuda" else None
    return {"model": model, "batch": s.batch, "fits": True, "peak_mib": peak}


# --------------------------------------------------------------------------- report


def summarise(times: dict) -> dict:
    rows = {}
    for n, t in times.items():
        rows[n] = {"median_s": statistics.median(t["wall"]), "min_s": min(t["wall"]),
                   "cpu_median_s": statistics.median(t["cpu"]) if t["cpu"] else None,
                   "peak_mib": t.get("peak_mib")}
    nat = rows.get("torch natural", {}).get("median_s")
    for n, r in rows.items():
        r["x_natural"] = r["median_s"] / nat if nat else None
        floor, goal = GOALS.get(n, ("floor ibp", None))
        if floor in rows and n != floor:
            r["floor"] = floor
            r["x_floor"] = r["median_s"] / rows[floor]["median_s"]
            r["x_floor_min"] = r["min_s"] / rows[floor]["min_s"]
            if r["cpu_median_s"] and rows[floor]["cpu_median_s"]:
                r["x_floor_cpu"] = r["cpu_median_s"] / rows[floor]["cpu_median_s"]
            if goal is not None:  # judged on CPU time where there is one (robust to load)
                r["goal"] = goal
                r["meets_goal"] = r.get("x_floor_cpu", r["x_floor"]) <= goal
    return rows


def markdown(rows: dict, cpu: bool) -> str:
    head = ["row", "median s", "min s"] + (["CPU s (median)"] if cpu else []) + [
        "× torch natural", "× floor (median / min" + (" / CPU)" if cpu else ")"), "floor",
        "goal (" + ("CPU" if cpu else "median") + ")", "peak MiB " +
        ("(RSS)" if cpu else "(allocated)")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in rows.items():
        cells = [n, f"{r['median_s']:.4f}", f"{r['min_s']:.4f}"]
        if cpu:
            cells.append(f"{r['cpu_median_s']:.4f}" if r["cpu_median_s"] else "-")
        cells.append(f"{r['x_natural']:.2f}" if r["x_natural"] else "-")
        ratios = [r.get(k) for k in ("x_floor", "x_floor_min", "x_floor_cpu")[:3 if cpu else 2]]
        cells.append(" / ".join("-" if v is None else f"{v:.3f}" for v in ratios)
                     if "x_floor" in r else "-")
        cells.append(r.get("floor", "-"))
        met = "met" if r.get("meets_goal") else "NOT met"
        cells.append(f"≤ {r['goal']:.2f}: {met}" if "goal" in r else "-")
        cells.append(f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_COLUMNS = ("row", "median_s", "min_s", "cpu_median_s", "x_natural", "floor", "x_floor",
               "x_floor_cpu", "goal", "meets_goal", "peak_mib")


def write_csv(result: dict, path: Path) -> None:
    """The rows of ``result`` (the columns of ``CSV_COLUMNS``), then the setting they were
    measured in (device, model, batch, threads, repetitions, load average before and after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS + ("device", "batch", "threads", "reps", "load"))
        setting = (result["device"], result["batch"], result["threads"], result["reps"],
                   "{:.1f} -> {:.1f}".format(*result["load"]))
        for name, r in result["rows"].items():
            cells = [name] + [r.get(k) for k in CSV_COLUMNS[1:]]
            w.writerow([f"{c:.4f}" if isinstance(c, float) else "" if c is None else c
                        for c in cells] + list(setting))


def phase_markdown(table: dict) -> str:
    lines = ["| method | " + " | ".join(f"{p} s/epoch (Shi et al.)" for p in PHASES) + " |",
             "|---|" + "---|" * len(PHASES)]
    for m, phases in table.items():
        cells = [f"{phases[p]:.1f} ({TABLE3.get(m, {}).get(p, '-')})" for p in PHASES]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda")
    p.add_argument("--model", default="cnn7")
    p.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 128 on GPU")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per row (>= 7)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every conf/method")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--keep-freed-memory", type=int, choices=(0, 1), default=1,
                   help="CPU: glibc keeps freed memory (fastcert.memory), as runs do")
    p.add_argument("--phases", action="store_true", help="s/epoch per ε phase (default on GPU)")
    p.add_argument("--fit-check", action="store_true",
                   help="does a ResNeXt TinyImageNet step fit (default on GPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS processes")
    p.add_argument("--quick", action="store_true",
                   help="tiny CNN-7 (width 1/8), batch 4, 2 repetitions: the test suite's run")
    p.add_argument("--out", default="bench_results", help="folder for bench.json")
    p.add_argument("--csv", default=None,
                   help="also write the rows here (docs/data/bench_*.csv: rendered by the docs)")
    return p.parse_args(argv)


def setting(args, device) -> Setting:
    quick = {"width": 0.125} if args.quick else {}
    batch = args.batch or (4 if args.quick else 128 if device.type == "cuda" else 32)
    return Setting(args.model, quick, (3, 32, 32), 10, batch, 8 / 255, device)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    warnings.filterwarnings("ignore")
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    device = acquire_device(args.device)
    if device.type == "cpu" and args.keep_freed_memory:
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    reps = 2 if args.quick and "--reps" not in argv else args.reps
    s = setting(args, device)
    methods = args.methods or default_methods()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fit's checkpoints: not on disk
    with tempfile.TemporaryDirectory(dir=shm, prefix="fastcert-bench-") as tmp:
        names = row_names(methods)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        peaks = ({n: rss_of_row(n, s, Path(tmp)) for n in names}
                 if device.type == "cpu" and not args.no_memory else {})
        times = interleaved(names, s, reps, Path(tmp))
        for n, peak in peaks.items():
            times[n]["peak_mib"] = peak
        rows = summarise(times)
        result = {"model": s.model, "model_options": s.model_options, "batch": s.batch,
                  "device": str(device), "reps": reps, "threads": torch.get_num_threads(),
                  "eps": s.eps, "eps_target": s.eps_target, "rows": rows,
                  "time_s": time.perf_counter() - t0, "load": (load0, os.getloadavg()[0])}
        print(f"\n{s.model} {s.model_options or ''}, batch {s.batch}, {device}, "
              f"{torch.get_num_threads()} thread(s), ε = ε_target/2 = {s.eps:.5f}; median and "
              f"min over {reps} interleaved repetitions\n")
        print(markdown(rows, device.type == "cpu"))
        if args.phases or device.type == "cuda":
            n_train = 8 * s.batch if args.quick else CIFAR_TRAIN
            result["phases"] = phase_table(s, reps, Path(tmp), n_train)
            result["phases_n_train"] = n_train
            print(f"\ns/epoch per ε phase ({n_train} CIFAR-shaped images, batch {s.batch}; "
                  f"Table 3 of Shi et al. 2021 in parentheses)\n")
            print(phase_markdown(result["phases"]))
        if args.fit_check or device.type == "cuda":
            quick = ({"cardinality": 2, "bottleneck_width": 2, "stem_width": 4, "fc_width": 16}
                     if args.quick else {})
            result["fit_check"] = fits_step(s, Path(tmp), model_options=quick)
            fc = result["fit_check"]
            print(f"\nResNeXt, TinyImageNet shapes, fast IBP, batch {fc['batch']}: "
                  f"{'fits' if fc['fits'] else 'does NOT fit'}"
                  + (f" (peak {fc['peak_mib']:.0f} MiB)" if fc.get("peak_mib") else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.csv:
        write_csv(result, Path(args.csv))
    return result


if __name__ == "__main__":
    main()
