"""Golden values (the habit of auto_LiRPA's tests/testcase.py): stored margin lower bounds of
every model family under IBP, CROWN-IBP, CROWN and α-CROWN, and the metrics of the
``debug=smoke`` run, compared at a tight tolerance, so that a compat patch, an auto_LiRPA or
torch upgrade, or a change of a model family that moves a bound fails here.

Regenerate (after a deliberate change; review the diff of tests/golden/ before committing):

    FASTCERT_REGEN_GOLDEN=1 python -m pytest -n 0 tests/test_golden.py

Each family is built at the tiny options stored with its values (``options``), with every
parameter and BatchNorm buffer drawn from NumPy's seeded generator (:func:`fill`), so the
values depend on the architecture and the bound code, not on torch's initialisers or RNG
kernels. Inputs: 2 NumPy-drawn images of shape 3x8x8 in [0, 1], labels 0 and 1, the L∞ box of
radius ``eps`` clipped to [0, 1], the network in eval mode. Stored per family, one file each
(``tests/golden/bounds/<family>.json``): the clean logits, the (2, 9) margin lower bounds of
:meth:`fastcert.bounds.BoundedNet.margin_bounds` for IBP, CROWN-IBP and CROWN, and the
per-example min_j m̲_j of the evaluation path (:func:`fastcert.evaluate._margin_lb`) for all
four bounds (the only form in which it computes α-CROWN). α-CROWN of the deepest families
(:data:`SLOW_ALPHA`) is compared by a ``slow`` test (``make test-all``).

Tolerance: |got - want| ≤ atol + rtol·|want| with rtol = 1e-4 and atol = 1e-5 · max(1, max
|want|) per stored array (the errors of a bound computation scale with its largest terms).
Accuracies are counts over the test set and compared exactly.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcert.bounds import Bound, BoundedNet
from fastcert.evaluate import _margin_lb

from conftest import MODEL_NAMES, build_model, compose_config, tiny_kwargs

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("FASTCERT_REGEN_GOLDEN") == "1"
RTOL, ATOL_SCALE = 1e-4, 1e-5
SEED, INPUT_SHAPE, NUM_CLASSES, BATCH, EPS = 0, (3, 8, 8), 10, 2, 0.02
MARGIN_BOUNDS = (Bound.IBP, Bound.CROWN_IBP, Bound.CROWN)
EVAL_BOUNDS = (Bound.IBP, Bound.CROWN_IBP, Bound.CROWN, Bound.ALPHA_CROWN)
#: Families whose α-CROWN takes 5-15 s on one CPU core (20 optimisation passes of full CROWN
#: through 5+ convolutions): compared by the slow test; every other value by the fast one.
SLOW_ALPHA = frozenset({"cnn7", "dm_large", "resnext", "wide_resnet"})
#: The smoke run: ``debug=smoke`` on the CPU (digits, the MLP, IBP, 2 epochs).
SMOKE = ["debug=smoke", "device=cpu"]
SMOKE_METRIC_KEYS = ("loss", "loss/natural", "loss/robust", "train_clean_acc",
                     "train_verified_acc")


# --------------------------------------------------------------------------- comparison


def tolerance(want) -> tuple[float, float]:
    """(rtol, atol) for one stored array: atol scales with its largest magnitude."""
    flat = np.asarray(want, dtype=np.float64).ravel()
    return RTOL, ATOL_SCALE * max(1.0, float(np.abs(flat).max(initial=0.0)))


def mismatches(name: str, got, want) -> list[str]:
    """The entries of ``got`` outside the tolerance of ``want`` (same shape), as messages."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return [f"{name}: shape {got.shape} != stored {want.shape}"]
    rtol, atol = tolerance(want)
    bad = ~(np.abs(got - want) <= atol + rtol * np.abs(want))
    return [f"{name}{[int(j) for j in i]}: {got[tuple(i)]!r} != stored {want[tuple(i)]!r} "
            f"(atol {atol:.2e}, rtol {rtol})" for i in np.argwhere(bad)]


def deviation(got, want) -> float:
    """max |got - want| / (atol + rtol·|want|): below 1 passes."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    rtol, atol = tolerance(want)
    return float((np.abs(got - want) / (atol + rtol * np.abs(want))).max(initial=0.0))


def _write_or_load(path: Path, computed: dict) -> dict | None:
    """With FASTCERT_REGEN_GOLDEN=1: write ``computed`` to ``path`` and say so (returns None);
    else the stored values (a missing file says how to create it)."""
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(computed, indent=1)
        # one line per innermost list of numbers (a row of bounds), for a readable diff
        text = re.sub(r"\[[^\[\]{}\"]*\]", lambda m: " ".join(m.group().split()), text)
        path.write_text(text + "\n")
        warnings.warn(f"FASTCERT_REGEN_GOLDEN=1: rewrote {path}", stacklevel=2)
        return None
    if not path.is_file():
        pytest.fail(f"{path} is missing: FASTCERT_REGEN_GOLDEN=1 pytest {Path(__file__).name}")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- bounds


def fill(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and BatchNorm buffer from ``numpy.random.default_rng(seed)``: weights
    U(±√(3/fan_in)) (unit variance through a layer), biases U(±0.1), BatchNorm scale
    U(0.5, 1.5), shift and running mean U(±0.1), running variance U(0.5, 1.5). Other buffers
    keep what the family drew (two_layer's fixed output signs: torch.randint, one value per
    draw on every CPU)."""
    rng = np.random.default_rng(seed)

    def draw(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.from_numpy(rng.uniform(low, high, tuple(t.shape))).to(t.dtype))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                draw(module.weight, 0.5, 1.5)
                draw(module.bias, -0.1, 0.1)
                draw(module.running_mean, -0.1, 0.1)
                draw(module.running_var, 0.5, 1.5)
                continue
            for name, p in module.named_parameters(recurse=False):
                if name == "weight" and p.dim() > 1:
                    bound = math.sqrt(3.0 / math.prod(p.shape[1:]))
                    draw(p, -bound, bound)
                else:
                    draw(p, -0.1, 0.1)


def family_bounds(name: str, options: dict, bounds=EVAL_BOUNDS) -> dict:
    """The golden values of one model family (see the module docstring), for ``bounds``."""
    torch.manual_seed(SEED)  # buffers fill leaves alone (two_layer's fixed ±1 output weights)
    model = build_model(name, INPUT_SHAPE, NUM_CLASSES, **options)
    fill(model, SEED)
    net = BoundedNet(model, torch.zeros(2, *INPUT_SHAPE), NUM_CLASSES).eval()
    rng = np.random.default_rng(SEED + 1)
    x = torch.from_numpy(rng.uniform(0, 1, (BATCH, *INPUT_SHAPE))).float()
    y = torch.arange(BATCH) % NUM_CLASSES
    lower, upper = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
    out: dict = {"options": options}
    with torch.no_grad():
        out["logits"] = net(x).tolist()
        for bound in MARGIN_BOUNDS:
            if bound in bounds:
                out[bound.key] = net.margin_bounds(x, y, lower, upper, bound)[1].tolist()
    out["eval_min"] = {b.key: _margin_lb(net, x, y, lower, upper, b).tolist() for b in bounds}
    return out


def _stored(name: str) -> dict:
    path = GOLDEN / "bounds" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _compare_family(name: str, got: dict, want: dict, bounds) -> list[str]:
    errors = []
    for key in ("logits", *(b.key for b in MARGIN_BOUNDS if b in bounds)):
        errors += mismatches(f"{name}.{key}", got[key], want[key])
    for key in (b.key for b in bounds):
        errors += mismatches(f"{name}.eval_min.{key}", got["eval_min"][key],
                             want["eval_min"][key])
    return errors


def test_every_model_family_has_golden_values():
    stored = sorted(p.stem for p in (GOLDEN / "bounds").glob("*.json"))
    assert stored == MODEL_NAMES, (
        "model families without (or with stale) golden values: "
        "FASTCERT_REGEN_GOLDEN=1 pytest tests/test_golden.py")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bounds_of_each_model_family_match_the_golden_values(name):
    """IBP, CROWN-IBP and CROWN of every family, and α-CROWN of the families where it takes a
    second or two (:data:`SLOW_ALPHA`: the slow test below)."""
    stored = _stored(name)
    options = stored["options"] if stored and not REGEN else tiny_kwargs(name)
    bounds = EVAL_BOUNDS if REGEN or name not in SLOW_ALPHA else MARGIN_BOUNDS
    got = family_bounds(name, options, bounds)
    note = ("alpha_crown: compared by the slow test (several seconds per family)"
            if name in SLOW_ALPHA else "every bound compared by the fast test")
    want = _write_or_load(GOLDEN / "bounds" / f"{name}.json", {
        "about": f"tests/test_golden.py: margin lower bounds of model={name}; "
                 f"FASTCERT_REGEN_GOLDEN=1 rewrites this file",
        "note": note, "torch": torch.__version__,
        "setup": {"seed": SEED, "input_shape": list(INPUT_SHAPE), "batch": BATCH,
                  "num_classes": NUM_CLASSES, "eps": EPS, "rtol": RTOL, "atol_scale": ATOL_SCALE},
        **got})
    if want is None:
        pytest.skip(f"golden bounds of {name} regenerated: nothing compared")
    errors = _compare_family(name, got, want, bounds)
    assert not errors, "\n".join(errors[:40])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_ALPHA))
def test_alpha_crown_of_the_deep_families_matches_the_golden_values(name):
    if REGEN:
        pytest.skip("FASTCERT_REGEN_GOLDEN=1: the fast test writes every bound")
    want = _stored(name)
    got = family_bounds(name, want["options"], (Bound.ALPHA_CROWN,))
    errors = _compare_family(name, got, want, (Bound.ALPHA_CROWN,))
    assert not errors, "\n".join(errors)


def _families() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((GOLDEN / "bounds").glob("*.json"))}


def test_the_evaluation_path_takes_the_smallest_margin_bound():
    """_margin_lb is min_j of margin_bounds for the bounds both compute (a golden file that
    disagrees with itself would hide a broken evaluation path)."""
    for name, ref in _families().items():
        for bound in MARGIN_BOUNDS:
            mins = np.asarray(ref[bound.key]).min(1)
            assert not mismatches(f"{name}.{bound.key}", ref["eval_min"][bound.key], mins)


def test_sound_bounds_are_ordered_and_below_the_clean_margins():
    """Every stored bound lies below the clean margins, and α-CROWN's (min over classes) is at
    least CROWN's, from whose slopes it starts."""
    families = _families()
    assert families
    for name, ref in families.items():
        logits, y = np.asarray(ref["logits"]), np.arange(BATCH) % NUM_CLASSES
        clean = np.stack([np.delete(logits[i, y[i]] - logits[i], y[i]) for i in range(BATCH)])
        for bound in MARGIN_BOUNDS:
            assert (np.asarray(ref[bound.key]) <= clean + 1e-4 * np.abs(clean).max()).all(), (
                name, bound.key)
        ev = {k: np.asarray(v) for k, v in ref["eval_min"].items()}
        slack = 1e-4 * max(1.0, np.abs(ev["crown"]).max())
        assert (ev["alpha_crown"] >= ev["crown"] - slack).all(), name


# --------------------------------------------------------------------------- smoke run


def smoke_metrics(run_dir: Path) -> dict:
    """The accuracies of ``debug=smoke``'s results.json and the losses and training
    accuracies of its metrics.jsonl."""
    from fastcert.pipeline import run

    results = run(compose_config(overrides=SMOKE), run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"results": {k: v for k, v in sorted(results.items()) if k.endswith("_acc")},
            "metrics": [{"epoch": m["epoch"], **{k: m[k] for k in SMOKE_METRIC_KEYS if k in m}}
                        for m in lines]}


def test_smoke_run_metrics_match_the_golden_values(tmp_path):
    got = smoke_metrics(tmp_path / "run")
    want = _write_or_load(GOLDEN / "smoke.json", {
        "about": "tests/test_golden.py: `python -m fastcert.run " + " ".join(SMOKE) + "`: "
                 "results.json accuracies and metrics.jsonl losses; FASTCERT_REGEN_GOLDEN=1 "
                 "rewrites this file",
        "torch": torch.__version__, **got})
    if want is None:
        pytest.skip("golden smoke metrics regenerated: nothing compared")
    assert got["results"] == want["results"]  # accuracies: counts over the test set, exact
    assert [sorted(m) for m in got["metrics"]] == [sorted(m) for m in want["metrics"]]
    errors = []
    for key in SMOKE_METRIC_KEYS:
        series = [(m[key], w[key]) for m, w in zip(got["metrics"], want["metrics"], strict=True)
                  if key in w]
        if series:
            errors += mismatches(f"metrics.{key}", [g for g, _ in series], [w for _, w in series])
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------- the comparison


def test_comparison_rejects_a_bound_moved_beyond_its_tolerance():
    """One stored value moved by 10x its tolerance fails; by 0.1x it passes."""
    families = _families()
    assert families, "no golden bounds stored"
    for name, ref in families.items():
        for key in (b.key for b in MARGIN_BOUNDS):
            want = np.asarray(ref[key])
            rtol, atol = tolerance(want)
            for factor, fails in ((10.0, True), (0.1, False)):
                moved = want.copy()
                moved[1, 2] += factor * (atol + rtol * abs(want[1, 2]))
                assert bool(mismatches(key, moved, want)) is fails, (name, key, factor)
                assert (deviation(moved, want) > 1) is fails
