"""``python -m fastcert.export checkpoint=PATH [eps=0.1] [only_undecided=true] ...``

Writes a trained model and its robustness properties in the format of VNN-COMP, which
complete verifiers (α,β-CROWN, NNV, Marabou, ...) read, so that the examples ``certify`` left
undecided can be settled by complete verification. Into ``<checkpoint dir>/export/``:

* ``model.onnx`` — the network in eval mode (BatchNorm on its running statistics), input
  ``input`` of shape (1, C, H, W) in the *normalised* space the loaders produce, output
  ``logits`` (1, K); exported with torch's TorchScript-based ONNX exporter;
* ``vnnlib/<index>.vnnlib`` — one property per test example (``index``: its position in the
  full test set): input variables ``X_0 … X_{CHW-1}`` (the input flattened in C-order) in the
  box of :meth:`fastcert.data.DataBundle.eps_box` (the clipped L∞ ball of pixel radius ε, in
  normalised units, rounded outward so it contains the exact box), written with
  ``repr(float(v))``, which reads back as exactly the float32 bound; output variables
  ``Y_0 … Y_{K-1}``; and the *negation* of robustness, ``∨_{j≠y} (Y_j ≥ Y_y)``: the property
  is UNSAT iff the example is robust, SAT with a counterexample otherwise;
* ``instances.csv`` — ``model.onnx,vnnlib/<index>.vnnlib,<timeout>`` per property, as
  VNN-COMP benchmarks list them;
* ``export.json`` — the checkpoint, ε, data, normalisation, and per property its index and
  label.

``only_undecided=true`` exports only the examples whose verdict in
``<checkpoint dir>/certify/certify.csv`` (or ``certify_csv=PATH``) at this ε is ``unknown``:
clean-correct, not broken by the attack, not verified by the cascade.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fastcert import rebuild

ONNX_INPUT, ONNX_OUTPUT = "input", "logits"


def vnnlib_text(lower, upper, label: int, num_classes: int, comment: str = "") -> str:
    """One VNN-LIB property: ``lower <= X <= upper`` (flattened, C-order) and some class
    j ≠ ``label`` with ``Y_j >= Y_label``."""
    lo = [float(v) for v in lower.reshape(-1).tolist()]
    hi = [float(v) for v in upper.reshape(-1).tolist()]
    lines = [f"; {comment}"] if comment else []
    lines += [f"(declare-const X_{i} Real)" for i in range(len(lo))]
    lines += [f"(declare-const Y_{k} Real)" for k in range(num_classes)]
    lines.append("; the input box (normalised units)")
    for i, (a, b) in enumerate(zip(lo, hi)):
        lines.append(f"(assert (<= X_{i} {b!r}))")
        lines.append(f"(assert (>= X_{i} {a!r}))")
    lines.append(f"; not robust: some class j != {label} scores at least as high as {label}")
    lines.append("(assert (or")
    lines += [f"    (and (>= Y_{j} Y_{label}))" for j in range(num_classes) if j != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def undecided_indices(path: Path, eps: float) -> set[int]:
    """The test indices whose verdict in certify.csv at ``eps`` is ``unknown``."""
    from fastcert.config import ConfigError

    if not path.is_file():
        raise ConfigError(f"only_undecided=true reads {path}, which does not exist: run "
                          f"python -m fastcert.certify checkpoint=... eps={eps} first, or "
                          f"point certify_csv= at its certify.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    at_eps = [r for r in rows if math.isclose(float(r["eps"]), eps, rel_tol=1e-9)]
    if not at_eps:
        present = sorted({float(r["eps"]) for r in rows})
        raise ConfigError(f"{path} has no rows at eps={eps} (it has {present}); certify at "
                          f"this eps first, or export at one of those")
    return {int(r["index"]) for r in at_eps if r["verdict"] == "unknown"}


def write_onnx(model, input_shape, path: Path, opset: int) -> None:
    """``model`` (in eval mode) as ONNX: input ``input`` (1, C, H, W), output ``logits``."""
    import torch

    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():
        # chosen on purpose: it needs only ``onnx`` (the torch.export-based one also needs
        # onnxscript) and writes plain opset graphs that VNN-COMP tools read
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript")
        torch.onnx.export(model, (example,), str(path), dynamo=False,
                          input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          opset_version=opset)


def write_properties(data, eps: float, wanted: set[int] | None, out_dir: Path) -> list[dict]:
    """``out_dir/vnnlib/<index>.vnnlib`` for each test example of ``data`` (those in
    ``wanted`` when given) at radius ``eps``; their index, label and file."""
    dataset = data.test.dataset
    indices = [int(i) for i in getattr(dataset, "indices", range(len(dataset)))]
    properties, position = [], 0
    for x, y in data.test:
        lower, upper = data.eps_box(x, eps)
        for b in range(len(y)):
            index, label = indices[position], int(y[b])
            position += 1
            if wanted is not None and index not in wanted:
                continue
            name = f"vnnlib/{index}.vnnlib"
            comment = (f"fastcert: test example {index} (label {label}) of {data.name}, "
                       f"L-inf eps={eps:g} in pixel units, box in the model's normalised "
                       f"input space")
            (out_dir / name).write_text(vnnlib_text(lower[b], upper[b], label,
                                                    data.num_classes, comment))
            properties.append({"index": index, "label": label, "vnnlib": name})
    return properties


def export(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Write model.onnx, the VNN-LIB properties, instances.csv and export.json into
    ``out_dir``; returns the export.json dict."""
    import torch

    from fastcert.checkpoint import write_text_atomic
    from fastcert.config import ConfigError, coerce, parse_number
    from fastcert.settings import check_eps

    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ConfigError("fastcert.export needs the onnx package: pip install onnx") from None
    out_dir = Path(out_dir)
    trained = rebuild.load_trained(cfg)
    path, run_cfg = trained.path, trained.config
    default = rebuild.tested_radius(run_cfg)
    eps = parse_number(default if cfg.get("eps") is None else cfg.eps, "eps")
    check_eps(eps, parse_number(run_cfg.data.eps_max, "data.eps_max"))
    timeout = coerce(cfg.timeout, float, "timeout")
    only = coerce(cfg.only_undecided, bool, "only_undecided")
    csv_path = Path(str(cfg.certify_csv)) if cfg.get("certify_csv") else (
        path.parent / "certify" / "certify.csv")
    wanted = undecided_indices(csv_path, eps) if only else None

    built = rebuild.build_trained(trained, torch.device("cpu"))
    model, data = built.net.model, built.data
    model.eval()
    (out_dir / "vnnlib").mkdir(parents=True, exist_ok=True)
    write_onnx(model, data.input_shape, out_dir / "model.onnx", int(cfg.opset))
    properties = write_properties(data, eps, wanted, out_dir)
    (out_dir / "instances.csv").write_text(
        "".join(f"model.onnx,{p['vnnlib']},{timeout:g}\n" for p in properties))
    summary = {"checkpoint": str(path.resolve()), "config_source": trained.source,
               "epoch": trained.state.get("epoch"), "data": data.name, "eps": eps,
               "input_shape": list(data.input_shape), "num_classes": data.num_classes,
               "mean": data.mean.tolist(), "std": data.std.tolist(),
               "onnx": {"file": "model.onnx", "input": ONNX_INPUT, "output": ONNX_OUTPUT,
                        "opset": int(cfg.opset)},
               "only_undecided": only, "certify_csv": str(csv_path) if only else None,
               "timeout_s": timeout, "properties": properties}
    write_text_atomic(out_dir / "export.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out_dir / 'model.onnx'} and {len(properties)} VNN-LIB properties "
          f"(eps={eps:g}) listed in {out_dir / 'instances.csv'}", flush=True)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from fastcert.cli import exit_on_known_errors

    out_dir = HydraConfig.get().runtime.output_dir
    print(f"export dir: {out_dir}", flush=True)
    with exit_on_known_errors():
        export(cfg, out_dir)


def cli() -> None:
    """``fastcert-export`` (the console script) and ``python -m fastcert.export``: a missing or
    mistyped ``checkpoint=`` is refused in one line (exit 2) before Hydra starts. Each export
    claims a fresh dir (:func:`fastcert.rundir.claim`): ``<checkpoint dir>/export`` (or
    ``hydra.run.dir=``), else ``export_1``, ``export_2`` … so that no export overwrites
    another; a refused export leaves no dir behind."""
    import sys

    from fastcert import rundir
    from fastcert.cli import checkpoint_command

    created = []

    def claimed():
        argv = sys.argv[1:]
        if not any(a.startswith("-") for a in argv):  # a flag: Hydra's own handling
            out, made = rundir.claim(_export_dir(argv))
            created.extend(made)
            sys.argv.append(f"hydra.run.dir={out}")
        main()

    try:
        checkpoint_command(claimed, "fastcert.export")
    except SystemExit as e:
        if e.code not in (0, None):
            rundir.release(created)
        raise


def _export_dir(argv: list[str]) -> Path:
    """``hydra.run.dir=`` if given, else ``<checkpoint dir>/export``."""
    from fastcert.resolvers import checkpoint_dir

    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if given:
        return Path(given[-1])
    checkpoint = next(a.split("=", 1)[1] for a in argv if a.startswith("checkpoint="))
    return Path(checkpoint_dir(checkpoint)) / "export"


if __name__ == "__main__":
    cli()
