"""Every GPU figure in one command: ``make gpu-check`` (issue #24).

    python -m experiments.gpu_check [--device cuda|cpu] [--quick] [--out DIR]

Runs each piece as its own command (printed as ``$ ...`` before it runs, every one with a
time limit so the whole check stays under 8 minutes on one H100), then prints one Markdown
report and writes it, with a CSV of every figure (``section, subject, metric, value, unit,
note``), into ``--out`` (default ``gpu_check/<UTC time>``; an existing report there is never
overwritten). The pieces:

* ``bench``: ``python -m experiments.bench --device cuda --batch 256 --phases``: every method's
  s/step and peak GPU memory with ratios to natural training and to the bare auto_LiRPA floor
  (CNN-7, CIFAR-10 shapes, batch 256, Shi et al.'s setting), and Table 3 of Shi et al. 2021:
  s/epoch in the ε = 0, ramp and final phases for IBP, CROWN-IBP (loss fusion) and fast IBP
  on 50,000 synthetic CIFAR-10-shaped images, extrapolated from timed steps (median step ×
  batches per epoch), beside the paper's RTX 2080 Ti numbers;
* ``tiny``: ResNeXt and CNN-7 at TinyImageNet shapes (3×64×64, 200 classes), IBP and CROWN-IBP:
  s/step at batch 128 and the largest batch that fits (:func:`largest_batch`);
* ``data``: the on-device data path (:class:`fastcert.data.DeviceBatches`, crop and flip on the
  device) against a DataLoader (4 workers, the same crop and flip by torchvision per example,
  pinned memory), s/epoch of the data alone (50,000 images, batch 256, every batch on the
  device) and of IBP training (extrapolated from timed steps);
* ``certify``: CROWN and α-CROWN s/example on a CNN-7 at CIFAR shapes (ε = 8/255);
* ``ddp``: a 2-step data-parallel run through torchrun on every visible GPU (NCCL; one GPU:
  world size 1), ``debug=smoke``;
* ``pool``: a 2-job multirun (``seed=0,1``, joblib) whose jobs take their GPU from the device
  pool.

Without CUDA, ``--device cuda`` (the default) prints one ``error:`` line and exits 2.
``--device cpu --quick`` runs every piece on the CPU at tiny sizes (the test suite's run): the
figures mean nothing there, the commands and the report are the ones a GPU run gets.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR_EPS = 8 / 255
TINY_EPS = 1 / 255  # Shi et al. 2021's TinyImageNet ε
TINY_MODELS = ("resnext", "cnn7")
TINY_METHODS = ("ibp", "crown_ibp")
#: The CPU runs every piece at tiny sizes but on a slower device: its time limits are longer
QUICK_CPU_SLACK = 10.0
#: Tiny options of the models in --quick runs
QUICK_OPTIONS = {"cnn7": {"width": 0.125},
                 "resnext": {"cardinality": 2, "bottleneck_width": 2, "stem_width": 4,
                             "fc_width": 16}}


# --------------------------------------------------------------------------- the pieces


@dataclass
class Piece:
    """One command of the check: its name, argv, time limit (s) and extra environment."""

    name: str
    argv: list[str]
    limit_s: int
    env: dict = field(default_factory=dict)


def pieces(device: str, quick: bool, out: Path) -> list[Piece]:
    """The check's commands, in the order they run."""
    py = sys.executable
    q = ["--quick"] if quick else []
    bench = [py, "-m", "experiments.bench", "--device", device, "--phases", *q,
             "--out", str(out / "bench")]
    bench += ["--methods", "ibp", "--no-memory"] if quick else ["--batch", "256"]
    own = [py, "-m", "experiments.gpu_check", "--device", device, *q, "--out", str(out)]
    smoke = ["debug=smoke", "data.batch_size=64", "data.limit_train=128", "epochs=1"]
    nproc = 1
    if device == "cuda":
        import torch

        nproc = max(1, torch.cuda.device_count())
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "fastcert.run", *smoke, f"hydra.run.dir={out / 'ddp'}"]
    pool = [py, "-m", "fastcert.run", "-m", *smoke, "seed=0,1", "hydra/launcher=joblib",
            f"hydra.sweep.dir={out / 'pool'}"]
    return [Piece("bench", bench, 200), Piece("tiny", [*own, "--piece", "tiny"], 100),
            Piece("data", [*own, "--piece", "data"], 50),
            Piece("certify", [*own, "--piece", "certify"], 45),
            Piece("ddp", torchrun, 35, {"OMP_NUM_THREADS": "1"}), Piece("pool", pool, 40)]


def run_piece(p: Piece, slack: float = 1.0) -> dict:
    """Run one piece (its command printed first) within ``slack`` times its time limit: exit
    status, seconds, the end of stderr."""
    print("$ " + shlex.join(p.argv), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **p.env}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(p.argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=p.limit_s * slack)
        rc, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(
            e.stderr, bytes) else (e.stderr or "")
    return {"command": shlex.join(p.argv), "rc": rc, "wall_s": time.perf_counter() - t0,
            "stderr_tail": err.strip().splitlines()[-3:] if rc != 0 else []}


# --------------------------------------------------------------------------- in-process pieces


def _setting(model: str, quick: bool, shape, classes: int, batch: int, eps: float, device):
    from experiments.bench_rows import Setting

    return Setting(model, QUICK_OPTIONS[model] if quick else {}, shape, classes, batch, eps,
                   device)


def _step_runner(s, method: str, tmp: Path):
    """One ``fit`` step of ``method`` at a batch size: its peak GPU memory in bytes (0 on the
    CPU), or None when it runs out of memory."""
    import torch

    from experiments.bench_rows import FitRow, fresh_model, random_batch
    from fastcert.bounds import BoundedNet

    def step(batch: int):
        t = _replace_batch(s, batch)
        cuda = t.device.type == "cuda"
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(t.device)
            x, y, box = random_batch(t)
            net = BoundedNet(fresh_model(t), x[:2], t.num_classes).train()
            FitRow(method, net, x, y, box, t.eps, t.eps_target, tmp / method).run()
        except torch.OutOfMemoryError:
            return None
        return torch.cuda.max_memory_allocated(t.device) if cuda else 0

    return step


def _replace_batch(s, batch: int):
    from dataclasses import replace

    return replace(s, batch=batch)


def largest_batch(step, start: int, capacity: int, tries: int = 4) -> dict:
    """The largest batch that fits, from two measured peaks: with p(b) the peak memory of one
    step at batch b (``step(b)``: bytes, None when out of memory), per-example memory
    m = (p(2b₀) - p(b₀))/b₀ and the fixed part p(b₀) - m·b₀ give the predicted largest batch
    b* = (0.97·capacity - fixed)/m (rounded down to a multiple of 8); a step at b* confirms it,
    else 0.9·b* is tried, up to ``tries`` times. Between b₀ and 2b₀ when 2b₀ does not fit."""
    p1 = step(start)
    if p1 is None:
        return {"largest": None, "predicted": None, "note": f"batch {start} does not fit"}
    p2 = step(2 * start)
    if p2 is None:
        lo, hi = start, 2 * start
        while hi - lo > max(8, start // 8):
            mid = (lo + hi) // 16 * 8
            lo, hi = (mid, hi) if step(mid) is not None else (lo, mid)
        return {"largest": lo, "predicted": None, "note": f"{2 * start} does not fit"}
    per = max((p2 - p1) / start, 1.0)
    predicted = int((0.97 * capacity - (p1 - per * start)) / per) // 8 * 8
    guess = predicted
    for _ in range(tries):
        if guess <= 2 * start:
            break
        if step(guess) is not None:
            return {"largest": guess, "predicted": predicted, "note": "confirmed by a step"}
        guess = int(guess * 0.9) // 8 * 8
    return {"largest": 2 * start, "predicted": predicted, "note": "predicted batches failed"}


def _median_step(s, method: str, tmp: Path, steps: int) -> float:
    from experiments.bench_rows import FitRow, fresh_model, random_batch
    from fastcert.bounds import BoundedNet

    x, y, box = random_batch(s)
    net = BoundedNet(fresh_model(s), x[:2], s.num_classes).train()
    row = FitRow(method, net, x, y, box, s.eps, s.eps_target, tmp / method, timed=steps)
    return statistics.median(row.run())


def tiny_piece(device, quick: bool, tmp: Path, save=None) -> list[dict]:
    """TinyImageNet shapes: s/step at batch 128 (4 with --quick) and the largest batch;
    ``save`` gets the records so far after each model and method (a piece cut short by its
    time limit keeps what it measured)."""
    import torch

    batch = 4 if quick else 128
    out = []
    for model in TINY_MODELS:
        for method in TINY_METHODS:
            s = _setting(model, quick, (3, 64, 64), 200, batch, TINY_EPS, device)
            rec = {"model": model, "method": method, "batch": batch,
                   "s_per_step": _median_step(s, method, tmp, 1 if quick else 3)}
            if device.type == "cuda":
                capacity = torch.cuda.get_device_properties(device).total_memory
                rec.update(largest_batch(_step_runner(s, method, tmp), 128, capacity))
            else:
                rec.update({"largest": None, "predicted": None, "note": "no GPU memory"})
            out.append(rec)
            if save is not None:
                save(out)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


class _Augmented:
    """A map-style dataset of CIFAR-shaped tensors with torchvision's crop and flip per
    example (the DataLoader path's augmentation)."""

    def __init__(self, x, y):
        from torchvision import transforms

        self.x, self.y = x, y
        self.t = transforms.Compose([transforms.RandomCrop(32, padding=4, padding_mode="edge"),
                                     transforms.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.t(self.x[i]), self.y[i]


def _epoch_seconds(batches, device) -> float:
    from experiments.bench_rows import _sync

    _sync(device)
    t0 = time.perf_counter()
    for _ in _on(batches, device):
        pass
    _sync(device)
    return time.perf_counter() - t0


def data_piece(device, quick: bool, tmp: Path) -> list[dict]:
    """s/epoch of the data alone and of IBP training, on-device batches against a
    DataLoader."""
    import torch

    from experiments.bench_rows import FitRow, cifar_box, fresh_model
    from fastcert.bounds import BoundedNet
    from fastcert.data import CropFlip, DeviceBatches

    n, batch = (256, 32) if quick else (50_000, 256)
    g = torch.Generator().manual_seed(0)
    box = cifar_box()
    xs = box.from_pixels(torch.rand(n, 3, 32, 32, generator=g))
    ys = torch.randint(0, 10, (n,), generator=g)
    paths = {
        "on device": lambda: DeviceBatches(xs.to(device), ys.to(device), batch, shuffle=True,
                                           generator=torch.Generator().manual_seed(0),
                                           augment=CropFlip(4, 0.5)),
        "DataLoader": lambda: torch.utils.data.DataLoader(
            _Augmented(xs, ys), batch, shuffle=True, num_workers=0 if quick else 4,
            pin_memory=device.type == "cuda", drop_last=False)}
    s = _setting("cnn7", quick, (3, 32, 32), 10, batch, CIFAR_EPS, device)
    steps = -(-n // batch)
    out = []
    for name, make in paths.items():
        data = make()
        data_s = _epoch_seconds(data, device)
        net = BoundedNet(fresh_model(s), xs[:2].to(device), 10).train()
        row = FitRow("ibp", net, xs[:2], ys[:2], box, s.eps, s.eps_target, tmp / name,
                     timed=3 if quick else 10, length=steps, source=lambda d=data: _on(d, device))
        out.append({"path": name, "images": n, "batch": batch, "data_s_per_epoch": data_s,
                    "ibp_s_per_epoch": statistics.median(row.run()) * steps})
    return out


def _on(data, device):
    for x, y in data:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def certify_piece(device, quick: bool) -> list[dict]:
    """CROWN and α-CROWN s/example on a CNN-7 at CIFAR shapes (8×8 images and 2 α-CROWN
    iterations with --quick; else certify's ``alpha_crown`` settings): each verifier's
    evaluation less one without verifiers (the clean pass and a no-step attack), over ``n``
    examples."""
    from omegaconf import OmegaConf

    from experiments.bench_rows import _sync, cifar_box, fresh_model, random_batch
    from fastcert.attacks import PGDConfig
    from fastcert.bounds import BoundedNet
    from fastcert.evaluate import evaluate

    n, batch, shape = (2, 2, (3, 8, 8)) if quick else (32, 32, (3, 32, 32))
    s = _setting("cnn7", quick, shape, 10, n, CIFAR_EPS, device)
    x, y, _ = random_batch(s)
    box = cifar_box()
    net = BoundedNet(fresh_model(s), x[:2], 10).eval()
    alpha = OmegaConf.load(ROOT / "fastcert" / "conf" / "certify.yaml").alpha_crown
    net.bounded.set_bound_opts({"optimize_bound_args": {
        "iteration": 2 if quick else int(alpha.iterations), "lr_alpha": float(alpha.lr)}})
    loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    no_attack = PGDConfig(steps=0, random_start=False)

    def seconds(verifiers) -> float:
        _sync(device)
        t0 = time.perf_counter()
        evaluate(net, loader, box.eps_box, CIFAR_EPS, verifiers, no_attack, device)
        _sync(device)
        return time.perf_counter() - t0

    seconds(["crown"])  # warm-up
    base = seconds([])
    return [{"verifier": v, "examples": n, "batch": batch,
             "s_per_example": max(seconds([v]) - base, 0.0) / n}
            for v in ("crown", "alpha_crown")]


def run_own_piece(name: str, device_name: str, quick: bool, out: Path) -> None:
    import tempfile
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1 if device_name == "cpu" else torch.get_num_threads())
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    path = out / f"{name}.json"

    def save(result):
        path.write_text(json.dumps(result, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix=f"fastcert-gpu-check-{name}-") as tmp:
        from experiments.bench_rows import quiet

        with quiet():
            if name == "certify":
                save(certify_piece(device, quick))
            elif name == "tiny":
                tiny_piece(device, quick, Path(tmp), save)
            else:
                save(data_piece(device, quick, Path(tmp)))


# --------------------------------------------------------------------------- the report


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _runs_of(out: Path) -> dict:
    """What the ddp and pool runs wrote: results.json of each run dir."""
    pool = sorted((out / "pool").glob("*/results.json")) if (out / "pool").is_dir() else []
    return {"ddp": (out / "ddp" / "results.json").is_file(), "pool_jobs": len(pool)}


def figures(out: Path, status: dict, device_name: str) -> list[dict]:
    """Every figure of the check as CSV rows (section, subject, metric, value, unit, note)."""
    from experiments.bench import TABLE3

    rows = []

    def add(section, subject, metric, value, unit, note=""):
        rows.append({"section": section, "subject": subject, "metric": metric,
                     "value": value, "unit": unit, "note": note})

    bench = _load(out / "bench" / "bench.json")
    if bench:
        for name, r in bench["rows"].items():
            add("bench", name, "s/step", r["median_s"], "s", f"batch {bench['batch']}")
            add("bench", name, "peak memory", r.get("peak_mib"), "MiB")
            add("bench", name, "x torch natural", r.get("x_natural"), "ratio")
            add("bench", name, "x floor", r.get("x_floor"), "ratio", r.get("floor", ""))
        note = (f"{bench.get('phases_n_train')} images, extrapolated from timed steps; "
                "Shi et al. 2021 Table 3 (RTX 2080 Ti) as reference")
        for method, phases in bench.get("phases", {}).items():
            for phase, value in phases.items():
                add("table3", method, f"s/epoch {phase}", value, "s",
                    f"{note}: {TABLE3.get(method, {}).get(phase, '-')}")
    for r in _load(out / "tiny.json") or []:
        subject = f"{r['model']} {r['method']}"
        add("tinyimagenet", subject, f"s/step at batch {r['batch']}", r["s_per_step"], "s")
        add("tinyimagenet", subject, "largest batch", r["largest"], "examples",
            f"predicted {r['predicted']}; {r['note']}")
    for r in _load(out / "data.json") or []:
        add("data path", r["path"], "data s/epoch", r["data_s_per_epoch"], "s",
            f"{r['images']} images, batch {r['batch']}")
        add("data path", r["path"], "IBP training s/epoch", r["ibp_s_per_epoch"], "s",
            "extrapolated from timed steps")
    for r in _load(out / "certify.json") or []:
        add("certify", r["verifier"], "s/example", r["s_per_example"], "s",
            f"CNN-7, CIFAR shapes, {r['examples']} examples, batch {r['batch']}")
    runs = _runs_of(out)
    add("runs", "ddp", "finished", int(runs["ddp"]), "bool", "torchrun, debug=smoke, 2 steps")
    add("runs", "pool", "jobs finished", runs["pool_jobs"], "jobs", "2-job multirun, joblib")
    for name, st in status.items():
        add("commands", name, "exit status", st["rc"], "", st["command"])
        add("commands", name, "wall", st["wall_s"], "s")
    for r in rows:
        r["device"] = device_name
    return rows


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(rows: list[dict], header: str) -> str:
    """The report: one table per section, then the commands."""
    lines = [f"# make gpu-check: {header}", ""]
    sections = list(dict.fromkeys(r["section"] for r in rows))
    for section in sections:
        lines += [f"## {section}", "", "| subject | metric | value | unit | note |",
                  "|---|---|---|---|---|"]
        for r in (r for r in rows if r["section"] == section):
            lines.append(f"| {r['subject']} | {r['metric']} | {_fmt(r['value'])} | "
                         f"{r['unit']} | {r['note']} |")
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)


# --------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's run)")
    p.add_argument("--out", default=None, help="report folder (default gpu_check/<UTC time>)")
    p.add_argument("--piece", choices=("tiny", "data", "certify"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _device_line(device: str) -> str:
    import torch

    if device == "cpu":
        return "CPU"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {names[0]}" if names else "CUDA"


def main(argv=None) -> int:
    args = parse(argv)
    if args.piece:
        run_own_piece(args.piece, args.device, args.quick, Path(args.out))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here (torch.cuda.is_available() is False); "
              "run make gpu-check on a GPU machine, or python -m experiments.gpu_check "
              "--device cpu --quick to check the pieces on the CPU")
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out or ROOT / "gpu_check" / stamp).resolve()
    if (out / "gpu_check.md").exists():
        print(f"error: --out {out}: holds an earlier report; pass another --out (e.g. "
              f"--out {out}-2)")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    slack = QUICK_CPU_SLACK if args.device == "cpu" else 1.0
    status = {p.name: run_piece(p, slack) for p in pieces(args.device, args.quick, out)}
    for name, st in status.items():
        if st["rc"] != 0:
            print(f"  {name}: exit status {st['rc']}: " + " | ".join(st["stderr_tail"]))
    header = (f"{_device_line(args.device)}, torch {torch.__version__}, {stamp} UTC"
              + (", --quick" if args.quick else ""))
    rows = figures(out, status, _device_line(args.device))
    report = markdown(rows, header)
    (out / "gpu_check.md").write_text(report + "\n")
    write_csv(rows, out / "gpu_check.csv")
    print("\n" + report)
    print(f"report: {out / 'gpu_check.md'}, figures: {out / 'gpu_check.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
