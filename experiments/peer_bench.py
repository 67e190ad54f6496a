"""fastcert's training step beside CTRAIN's (the peer library), method by method (issue #24).

    python -m experiments.peer_bench [--ctrain-python PATH] [--rounds 3] [--steps 5]
                                     [--rows ...] [--csv docs/data/peer_bench.csv]

CTRAIN 0.6.1 (PyPI ``CTRAIN``) runs in its own virtual environment (default
``/work/venvs/ctrain/bin/python``, or ``$CTRAIN_PYTHON``) on auto_LiRPA 0.3, with fastcert's
compat patches (:mod:`fastcert.compat`) for torch 2.14 and two name shims for what CTRAIN
expects of a newer auto_LiRPA: the module ``auto_LiRPA.operators.relu`` (0.3 has
``BoundRelu`` in ``auto_LiRPA.operators``) and the input node ``/input-1`` (0.3 names it
``/input.1``); ``CTRAIN.eval`` (validation, and the bundled α,β-CROWN, which needs a newer
auto_LiRPA) is a stub: the training functions import it but never call it without a
validation loader; and its TAPS pivot search draws its random start on ``device="cuda"``, a
default its caller never overrides, which on a machine without CUDA becomes ``"cpu"``.
Without CTRAIN there it prints one line and exits 0. Build it with::

    python3 -m venv /work/venvs/ctrain
    /work/venvs/ctrain/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/venvs/ctrain/bin/pip install --no-deps CTRAIN==0.6.1 auto_LiRPA==0.3
    /work/venvs/ctrain/bin/pip install tqdm packaging appdirs pyyaml matplotlib onnx

Setting (both sides): CNN-7 with BatchNorm (each library's own: fastcert ``cnn7``, CTRAIN
``CNN7_Shi``, the same layers), one batch of 32 random CIFAR-10-shaped images normalised as
CIFAR-10's, ε = 8/255, one torch thread, Adam, gradient clipping 10, the allocator setting of
:func:`fastcert.memory.keep_freed_memory` applied in every process, and each library's real
training loop: :func:`fastcert.train.fit` (``experiments.bench_rows.FitRow``) and CTRAIN's
``*_train_model`` over a loader that repeats the batch; a step is the time between two batches
the loop asks for, the first untimed. Attacks: the same steps, restarts and step sizes on both sides
(fastcert's defaults; CTRAIN keeps its own step-size decay; no early stopping, as CTRAIN's
wrappers ship it). Regulariser weight 0.5 and L1 weight 1e-6: CTRAIN's wrappers' defaults.
Rows and ε phases (:data:`ROWS`): natural at ε = 0 (CTRAIN has no natural method:
its TAPS loop at ε = 0 is clean cross entropy through the BoundedModule), IBP, TAPS and STAPS
at the final ε (no regularisers on either side), fast IBP (CTRAIN's Shi-IBP), SABR and MTL-IBP
in the ramp (regularisers active on both sides).

``--rounds`` rounds, each a fresh fastcert process and a fresh CTRAIN process in alternating
order (interleaved); every process times ``--steps`` steps of every row. Per row: the median
over all timed steps of each side (wall clock and CPU time), and fastcert/CTRAIN of those
medians; the goal (issue #24) is ≤ 0.8, judged on CPU time (robust to a loaded machine).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CTRAIN_PYTHON = "/work/venvs/ctrain/bin/python"
BATCH, EPS, GOAL = 32, 8 / 255, 0.8
EPOCH_STEPS = 391  # batches of a CIFAR-10 epoch at batch 128

#: row -> (fastcert method, CTRAIN training function, ε phase, CTRAIN's attack arguments set
#: to fastcert's defaults: same steps, restarts, step size and small-box ratio)
ROWS = {
    "natural": ("natural", "taps_train_model", "eps0", {}),
    "IBP (final ε)": ("ibp", "shi_train_model", "final", {}),
    "fast IBP / Shi-IBP (ramp)": ("fast", "shi_train_model", "ramp", {}),
    "SABR (ramp)": ("sabr", "sabr_train_model", "ramp",
                    {"pgd_steps": 8, "pgd_restarts": 1, "pgd_step_size": 0.5,
                     "pgd_early_stopping": False, "subselection_ratio": 0.4}),
    "TAPS (final ε)": ("taps", "taps_train_model", "final",
                       {"taps_pgd_steps": 10, "taps_pgd_restarts": 1, "taps_pgd_step_size": 0.2}),
    "STAPS (final ε)": ("staps", "staps_train_model", "final",
                        {"sabr_pgd_steps": 10, "sabr_pgd_restarts": 1, "sabr_pgd_step_size": 0.2,
                         "sabr_pgd_early_stopping": False, "taps_pgd_steps": 10,
                         "taps_pgd_restarts": 1, "taps_pgd_step_size": 0.2,
                         "subselection_ratio": 0.4}),
    "MTL-IBP (ramp)": ("mtl_ibp", "mtl_ibp_train_model", "ramp",
                       {"pgd_n_steps": 1, "pgd_restarts": 1, "pgd_step_size": 10, "alpha": 0.5}),
}
#: phase -> (num_epochs, eps_schedule, start_epoch) of CTRAIN's scheduler: epoch ``start_epoch``
#: lies at ε = 0, in the ramp (0 < ε < ε_target) or at ε_target
CTRAIN_PHASES = {"eps0": (2, (1, 1), 0), "ramp": (2, (0, 2), 1), "final": (2, (0, 1), 1)}
#: fastcert's ε per phase (the ramp at its midpoint, as ``make bench``)
FASTCERT_EPS = {"eps0": 0.0, "ramp": EPS / 2, "final": EPS}
#: CNN-7's TAPS split in CTRAIN's 20 layers: the last hidden block and the output layer in the
#: head (fastcert's ``head_blocks=1``)
CTRAIN_BLOCKS = (16, 4)


def _batch():
    """The pixels and labels both sides train on, normalised as CIFAR-10's."""
    from fastcert.data import CIFAR10_MEAN, CIFAR10_STD

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    return (pixels - mean.view(3, 1, 1)) / std.view(3, 1, 1), y, mean, std


class _RepeatedBatch:
    """A CTRAIN training loader: ``steps`` times the batch, with the attributes CTRAIN reads
    (``mean``, ``std``, ``min``, ``max``, ``normalised``); marks when each batch is asked for.
    Its length is a CIFAR-10 epoch's at batch 128 (as fastcert's rows claim), which places
    CTRAIN's ε scheduler (:data:`CTRAIN_PHASES`)."""

    def __init__(self, x, y, mean, std, steps: int):
        self.x, self.y, self.steps = x, y, steps
        self.mean, self.std, self.normalised = mean, std, True
        self.min = ((0 - mean) / std).view(1, 3, 1, 1)
        self.max = ((1 - mean) / std).view(1, 3, 1, 1)
        self.marks: list[tuple[float, float]] = []

    def __len__(self):
        return EPOCH_STEPS

    def __iter__(self):
        for _ in range(self.steps):
            self.marks.append((time.perf_counter(), time.process_time()))
            yield self.x, self.y
        self.marks.append((time.perf_counter(), time.process_time()))

    def times(self) -> dict:
        """Wall and CPU seconds of each step after the first."""
        m = self.marks[1:]
        return {"wall": [b[0] - a[0] for a, b in zip(m, m[1:])],
                "cpu": [b[1] - a[1] for a, b in zip(m, m[1:])]}


# --------------------------------------------------------------------------- the two sides


def fastcert_side(rows: list[str], steps: int, run_dir: Path) -> dict:
    from experiments.bench_rows import FitRow, Setting, cifar_box, fresh_model
    from fastcert.bounds import BoundedNet

    s = Setting("cnn7", {}, (3, 32, 32), 10, BATCH, EPS, torch.device("cpu"))
    x, y, _, _ = _batch()
    out = {}
    for row in rows:
        method, _, phase, _ = ROWS[row]
        net = BoundedNet(fresh_model(s), x[:2], 10).train()
        fit = FitRow(method, net, x, y, cifar_box(), FASTCERT_EPS[phase], EPS, run_dir / method,
                     timed=steps)
        out[row] = {"wall": fit.run(), "cpu": fit.cpu_times()}
    return out


def _ctrain_imports() -> types.ModuleType:
    """CTRAIN's training functions on auto_LiRPA 0.3 (compat patches and the module shim)."""
    from fastcert import compat

    compat.apply()
    import auto_LiRPA.operators as ops

    if "auto_LiRPA.operators.relu" not in sys.modules:
        try:
            import auto_LiRPA.operators.relu  # noqa: F401  (a newer auto_LiRPA has it)
        except ImportError:
            shim = types.ModuleType("auto_LiRPA.operators.relu")
            shim.BoundRelu = ops.BoundRelu
            sys.modules[shim.__name__] = shim
    if "CTRAIN.eval" not in sys.modules:  # see the module docstring
        stub = types.ModuleType("CTRAIN.eval")
        for name in ("eval_acc", "eval_certified", "eval_epoch", "eval_adversarial"):
            setattr(stub, name, _not_loaded)
        sys.modules[stub.__name__] = stub
    import CTRAIN.bound.taps as taps_bound
    import CTRAIN.train.certified as certified

    pivots = taps_bound._get_pivotal_points_one_batch
    if pivots.__defaults__[-1] == "cuda" and not torch.cuda.is_available():
        pivots.__defaults__ = (*pivots.__defaults__[:-1], "cpu")
    return certified


def _not_loaded(*args, **kwargs):
    raise NotImplementedError("CTRAIN.eval is not loaded by experiments.peer_bench")


class _NodeNames(dict):
    """A BoundedModule's node table answering CTRAIN's ``/input-1`` for 0.3's ``/input.1``."""

    def __missing__(self, key):
        if key == "/input-1" and "/input.1" in self:
            return self["/input.1"]
        raise KeyError(key)


def _ctrain_model(function: str):
    from auto_LiRPA import BoundedModule
    from CTRAIN.model_definitions import CNN7_Shi
    from CTRAIN.train.certified.util import split_network

    torch.manual_seed(0)
    model = CNN7_Shi(in_shape=(3, 32, 32)).eval()
    opts = {"conv_mode": "patches", "relu": "adaptive"}  # CTRAIN's wrappers' default
    example = torch.ones(1, 3, 32, 32)
    bounded = BoundedModule(model, example, bound_opts=opts, device="cpu")
    bounded.__dict__["_modules"] = _NodeNames(bounded._modules)
    if function in ("taps_train_model", "staps_train_model"):  # as CTRAIN's TAPS wrappers do
        features, head = split_network(model, CTRAIN_BLOCKS, torch.zeros(1, 3, 32, 32), "cpu")
        bounded.bounded_blocks = [
            BoundedModule(features, example, bound_opts=opts, device="cpu"),
            BoundedModule(head, torch.zeros_like(features(example)), bound_opts=opts,
                          device="cpu")]
        bounded.original_blocks = [features, head]
    model.train()
    bounded.train()
    return model, bounded


def ctrain_side(rows: list[str], steps: int, run_dir: Path) -> dict:
    certified = _ctrain_imports()
    x, y, mean, std = _batch()
    out = {}
    for row in rows:
        _, function, phase, attack = ROWS[row]
        model, bounded = _ctrain_model(function)
        loader = _RepeatedBatch(x, y, mean, std, 1 + steps)
        epochs, schedule, start = CTRAIN_PHASES[phase]
        eps_std = (EPS / std).view(3, 1, 1)
        getattr(certified, function)(
            original_model=model, hardened_model=bounded, train_loader=loader,
            start_epoch=start, end_epoch=start + 1, num_epochs=epochs, eps=EPS, eps_std=eps_std,
            eps_schedule=schedule, optimizer=torch.optim.Adam(bounded.parameters(), lr=5e-4),
            n_classes=10, gradient_clip=10, l1_regularisation_weight=1e-6,
            shi_regularisation_weight=0.5, results_path=None, device="cpu", **attack)
        out[row] = loader.times()
    return out


# --------------------------------------------------------------------------- driver


def ctrain_available(python: str) -> str | None:
    """None when ``python`` imports CTRAIN, else why not (one line)."""
    if not Path(python).is_file():
        return f"no interpreter at {python}"
    probe = subprocess.run([python, "-c", "import CTRAIN"], capture_output=True, text=True)
    if probe.returncode:
        return (probe.stderr.strip().splitlines() or ["import CTRAIN failed"])[-1]
    return None


def _side_process(side: str, python: str, rows: list[str], steps: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [python, "-m", "experiments.peer_bench", "--side", side, "--steps", str(steps),
           "--side-out", str(out), "--rows", *rows]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {side} process failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def measure(python: str, rows: list[str], rounds: int, steps: int) -> dict:
    """{side: {row: {"wall": [...], "cpu": [...]}}} over ``rounds`` fresh process pairs."""
    times = {"fastcert": {r: {"wall": [], "cpu": []} for r in rows},
             "ctrain": {r: {"wall": [], "cpu": []} for r in rows}}
    with tempfile.TemporaryDirectory(prefix="fastcert-peer-") as tmp:
        for r in range(rounds):
            order = ("fastcert", "ctrain") if r % 2 == 0 else ("ctrain", "fastcert")
            for side in order:
                exe = sys.executable if side == "fastcert" else python
                got = _side_process(side, exe, rows, steps, Path(tmp) / f"{side}{r}.json")
                for row, t in got.items():
                    for k in ("wall", "cpu"):
                        times[side][row][k] += t[k]
                print(f"  round {r + 1}/{rounds}: {side} done", file=sys.stderr, flush=True)
    return times


def summarise(times: dict, load: tuple[float, float]) -> list[dict]:
    out = []
    for row, (method, function, phase, _) in ROWS.items():
        if row not in times["fastcert"]:
            continue
        f, c = times["fastcert"][row], times["ctrain"][row]
        rec = {"row": row, "fastcert": method, "ctrain": function, "phase": phase,
               "fastcert_s": statistics.median(f["wall"]), "ctrain_s": statistics.median(c["wall"]),
               "fastcert_cpu_s": statistics.median(f["cpu"]),
               "ctrain_cpu_s": statistics.median(c["cpu"]), "steps": len(f["wall"])}
        rec["ratio"] = rec["fastcert_s"] / rec["ctrain_s"]
        rec["ratio_cpu"] = rec["fastcert_cpu_s"] / rec["ctrain_cpu_s"]
        rec["goal_met"] = rec["ratio_cpu"] <= GOAL
        rec["load_start"], rec["load_end"] = load
        out.append(rec)
    return out


def markdown(records: list[dict]) -> str:
    lines = ["| row | fastcert s/step (CPU) | CTRAIN s/step (CPU) | fastcert/CTRAIN wall | "
             f"fastcert/CTRAIN CPU | ≤ {GOAL} |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['row']} | {r['fastcert_s']:.3f} ({r['fastcert_cpu_s']:.3f}) | "
                     f"{r['ctrain_s']:.3f} ({r['ctrain_cpu_s']:.3f}) | {r['ratio']:.2f} | "
                     f"{r['ratio_cpu']:.2f} | {'met' if r['goal_met'] else 'NOT met'} |")
    return "\n".join(lines)


def write_csv(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        for r in records:
            w.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctrain-python", default=os.environ.get("CTRAIN_PYTHON",
                                                             DEFAULT_CTRAIN_PYTHON))
    p.add_argument("--rounds", type=int, default=3, help="fresh process pairs")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row and process")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--csv", default=None, help="write the table here (e.g. docs/data/...)")
    p.add_argument("--side", choices=("fastcert", "ctrain"), help=argparse.SUPPRESS)
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _side_main(args) -> None:
    import warnings

    from fastcert.memory import keep_freed_memory

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    keep_freed_memory()
    side = fastcert_side if args.side == "fastcert" else ctrain_side
    with tempfile.TemporaryDirectory(prefix="fastcert-peer-side-") as tmp, \
            open(os.devnull, "w") as null:
        stdout, sys.stdout = sys.stdout, null  # both loops print progress and epoch lines
        try:
            times = side(args.rows, args.steps, Path(tmp))
        finally:
            sys.stdout = stdout
    Path(args.side_out).write_text(json.dumps(times))


def main(argv=None) -> int:
    args = parse(argv)
    if args.side:
        _side_main(args)
        return 0
    why = ctrain_available(args.ctrain_python)
    if why:
        print(f"peer_bench: CTRAIN is not installed for {args.ctrain_python} ({why}): skipped")
        return 0
    load0 = os.getloadavg()[0]
    times = measure(args.ctrain_python, args.rows, args.rounds, args.steps)
    records = summarise(times, (load0, os.getloadavg()[0]))
    print(f"\nCNN-7, batch {BATCH}, CIFAR shapes, 1 thread, keep_freed_memory on both sides; "
          f"medians over {args.rounds} x {args.steps} steps per side; load average "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print(markdown(records))
    if args.csv:
        write_csv(records, Path(args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
