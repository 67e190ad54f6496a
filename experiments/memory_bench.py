"""``python -m experiments.memory_bench [--checkpoint PATH | --model cnn7 --shape 3,32,32] ...``

Peak resident memory per phase of :func:`fastcert.evaluate.evaluate` under its memory budget
(:class:`fastcert.memory.Budget`): the attack and each verifier, every verifier on every example
(``cascade=False``), with seconds per example and the chunk the budget chose. Peaks are the
kernel's ``VmHWM`` of the process, reset per chunk (:func:`fastcert.memory.reset_peak`).

* default (``make bench``): a ``cnn_small`` on the 8×8 digits, trained ``--steps`` IBP steps in
  this process (phase ``train``), then evaluated on ``--limit`` test digits; once with
  ``keep_freed_memory`` (a CPU run's default: applied for the training steps, released by
  ``evaluate``) and once without, each in its own process;
* ``--checkpoint PATH``: a trained run's checkpoint on its test split (:mod:`fastcert.rebuild`);
* ``--model NAME --shape C,H,W``: an untrained model on uniform random inputs of that shape
  (e.g. CIFAR-shaped CNN-7: ``--model cnn7 --shape 3,32,32``).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

GIB = 2**30


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.memory_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a fastcert checkpoint (last.pt)")
    p.add_argument("--model", help="an untrained model of conf/model (with --shape)")
    p.add_argument("--shape", help="input shape C,H,W of --model, e.g. 3,32,32")
    p.add_argument("--eps", type=float, help="radius (default: the run's, else 2/255)")
    p.add_argument("--limit", type=int, default=256, help="test examples (default 256)")
    p.add_argument("--steps", type=int, default=20, help="training steps of the default bench")
    p.add_argument("--memory-gb", type=float, default=None, help="the budget (default: null)")
    p.add_argument("--verifiers", default="ibp,crown_ibp,crown,alpha_crown")
    p.add_argument("--iterations", type=int, default=20, help="α-CROWN's iterations")
    p.add_argument("--keep-freed", choices=["on", "off", "both"], default="both")
    p.add_argument("--json", action="store_true", help="one JSON line (the subprocess form)")
    return p.parse_args(argv)


def _random(args):
    """An untrained ``args.model`` and uniform random inputs of ``args.shape``."""
    import torch

    from fastcert.bounds import BoundedNet
    from fastcert.config import build_option

    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    model = build_option("model", args.model, {}, input_shape=shape, num_classes=10).eval()
    x = torch.rand(args.limit, *shape)
    y = torch.randint(0, 10, (args.limit,))
    net = BoundedNet(model, x[:2], 10)
    eps = 2 / 255 if args.eps is None else args.eps
    return net, [(x, y)], lambda x, e: ((x - e).clamp(0, 1), (x + e).clamp(0, 1)), eps


def _trained(args):
    """The checkpoint's network and ``args.limit`` examples of its test split."""
    import torch
    from omegaconf import OmegaConf

    from fastcert import rebuild
    from fastcert.config import parse_number

    cfg = OmegaConf.create({"checkpoint": args.checkpoint, "limit_test": args.limit,
                            "batch_size": None, "run_overrides": []})
    trained = rebuild.load_trained(cfg)
    built = rebuild.build_trained(trained, torch.device("cpu"))
    eps = parse_number(trained.config.eps, "eps") if args.eps is None else args.eps
    return built.net, built.data.test, built.data.eps_box, eps


def _digits_trained(args) -> tuple:
    """cnn_small on the digits after ``args.steps`` IBP training steps (phase ``train``)."""
    import torch
    from hydra import compose, initialize_config_module

    from fastcert import memory
    from fastcert.bounds import Bound, robust_ce_from_margins
    from fastcert.pipeline import build
    from fastcert.settings import validate

    with initialize_config_module("fastcert.conf", version_base="1.3"):
        cfg = compose("config", overrides=["model=cnn_small", f"data.limit_test={args.limit}",
                                           f"keep_freed_memory={args.keep_freed == 'on'}"])
    built = build(validate(cfg))
    net, data = built.net, built.data
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    memory.reset_peak()
    t0, steps = time.perf_counter(), 0
    net.train()
    while steps < args.steps:
        for x, y in data.train:
            lower, upper = data.eps_box(x, 0.05)
            logits, lb = net.margin_bounds(x, y, lower, upper, Bound.IBP)
            loss = torch.nn.functional.cross_entropy(logits, y) + robust_ce_from_margins(lb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == args.steps:
                break
    train = {"phase": "train", "peak": memory.peak_rss_bytes(), "examples": steps,
             "s_per_example": (time.perf_counter() - t0) / steps, "chunk": None}
    return (net, data.test, data.eps_box, 0.05), train


def measure(args) -> dict:
    """The phases' rows in this process."""
    import torch

    from fastcert import memory
    from fastcert.attacks import PGDConfig
    from fastcert.evaluate import evaluate

    torch.set_num_threads(1)
    rows = []
    if args.checkpoint:
        net, loader, box, eps = _trained(args)
    elif args.model:
        net, loader, box, eps = _random(args)
    else:
        (net, loader, box, eps), train = _digits_trained(args)
        rows.append(train)
    net.bounded.set_bound_opts({"optimize_bound_args": {"iteration": args.iterations,
                                                        "lr_alpha": 0.1}})
    budgets = []

    class Recorded(memory.Budget):
        def __init__(self, *a):
            super().__init__(*a)
            budgets.append(self)

    memory.Budget = Recorded
    result = evaluate(net, loader, box, eps, verifiers=args.verifiers.split(","),
                      pgd=PGDConfig(steps=10, restarts=1), memory_gb=args.memory_gb)
    n = len(result.label)
    for phase, peak in result.peak_rss.items():
        rows.append({"phase": phase, "peak": peak, "examples": n,
                     "s_per_example": result.stage_time_s[phase] / max(n, 1),
                     "chunk": budgets[0].chunk(phase)})
    return {"budget": budgets[0].bytes, "eps": eps, "rows": rows,
            "verified": {k: v for k, v in result.summary().items()}}


def _subprocess(argv: list[str], keep: str) -> dict:
    cmd = [sys.executable, "-m", "experiments.memory_bench", *argv, "--keep-freed", keep,
           "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(runs: dict[str, dict]) -> str:
    """Markdown: phase, peak RSS per allocator setting, s/example, chunk, budget."""
    names = list(runs)
    first = runs[names[0]]
    head = (["phase"] + [f"peak RSS, GiB ({k})" for k in names]
            + ["s/example", "chunk", "budget, GiB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(first["rows"]):
        peaks = [f"{runs[k]['rows'][i]['peak'] / GIB:.2f}" for k in names]
        chunk = "-" if row["chunk"] is None else str(row["chunk"])
        lines.append("| " + " | ".join([row["phase"], *peaks, f"{row['s_per_example']:.3g}",
                                        chunk, f"{first['budget'] / GIB:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _args(argv)
    if args.json:
        print(json.dumps(measure(args)))
        return
    raw = list(argv if argv is not None else sys.argv[1:])
    if "--keep-freed" in raw:
        i = raw.index("--keep-freed")
        del raw[i:i + 2]
    settings = ["on", "off"] if args.keep_freed == "both" else [args.keep_freed]
    runs = {f"keep_freed {k}": _subprocess(raw, k) for k in settings}
    print(table(runs))
    first = next(iter(runs.values()))
    print(f"eps {first['eps']:.4g}; " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                 first["verified"].items() if math.isfinite(v)))


if __name__ == "__main__":
    main()
