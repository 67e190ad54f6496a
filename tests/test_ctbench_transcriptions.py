"""Every ctbench preset against the CTBench script it reproduces, key by key.

``tests/ctbench_scripts/<setting>/<method>.yaml`` transcribe the flags of eth-sri/CTBench's
``scripts/examples/**/train_*.sh`` at commit 0f18162 (data, not code). :data:`MAPPING` is the
documented flag → fastcert key mapping with its unit conversions (the flags a script omits take
CTBench's defaults, :data:`DEFAULTS`, from ``args_factory.py``); :data:`IMPLIED` adds what
CTBench's code does for every script of a method or data set without a flag. A preset whose
composed config differs from its script, a flag with no mapping, or a script without a preset
fails. The six presets CTBench has no script for follow De Palma et al.'s README
(alessandrodepalma/expressive-losses): :data:`DE_PALMA`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from fastcert.config import options

from conftest import compose_config

SCRIPTS = Path(__file__).parent / "ctbench_scripts"
TRANSCRIPTIONS = sorted(SCRIPTS.glob("*/*.yaml"))


@dataclass
class Script:
    """A transcription, its flags completed with CTBench's defaults, and the preset checked."""

    flags: dict
    method: str      # the preset's method (fastcert method name)
    preset: str

    def get(self, flag: str):
        return self.flags.get(flag, DEFAULTS.get(flag))


#: CTBench's defaults (args_factory.py) of flags a script may omit.
DEFAULTS = {"L1-reg": 0.0, "use-pop-bn-stats": False, "use-swa": False, "swa-freq": 10,
            "relu-shrinkage": None, "model-selection": "robust_accu", "use-EDAC-step": False,
            "EDAC-step-size": 0.3, "use-loss-fusion": False, "grad-accu-batch": None,
            "attack-range-scale": 1.0, "lr-decay-factor": 0.2}

#: The flags that name the trained method → the fastcert presets' methods they allow.
METHOD_FLAGS = {
    frozenset({"use-ibp-training"}): {"fast", "ibp"},   # ibp: the same script without --fast-reg
    frozenset({"use-ibp-training", "use-small-box"}): {"sabr"},
    frozenset({"use-taps-training"}): {"taps"},
    frozenset({"use-taps-training", "use-small-box"}): {"staps"},
    frozenset({"use-DPBox-training"}): {"crown_ibp"},
    frozenset({"use-mtlibp-training"}): {"mtl_ibp"},
    frozenset({"use-ccibp-training"}): {"cc_ibp"},
    frozenset({"use-expibp-training"}): {"exp_ibp"},
    frozenset({"use-pgd-training"}): {"pgd"},
}

#: Flags that change nothing a preset trains or reports, and why.
IRRELEVANT = {
    "save-dir": "the output folder",
    "test-batch": "evaluation batching (eval-mode BatchNorm: no effect on results)",
    "test-steps": "the attack of CTBench's per-epoch test, what its selection scores; fastcert "
                  "selects with the run's eval.pgd",
    "keep-fusion-when-test": "the per-epoch test metric only; its one script (TinyImageNet "
                             "CROWN-IBP) does not select",
    "swa-start": "read with use-swa",
    "EDAC-step-size": "read with use-EDAC-step",
}

#: ``--block-sizes a b`` of cnn_7layer_bn (21 layers: normalisation, 5 × conv-BN-ReLU,
#: flatten, linear-BN-ReLU, linear) → ``method.head_blocks``, the ReLUs in the last b layers.
HEAD_BLOCKS = {4: 1, 8: 2, 11: 3, 17: 5}

#: What CTBench's ``robust_accu`` selection becomes (fastcert selects on sound bounds or an
#: attack only): IBP/CROWN-IBP rows their certified accuracy; PGD, SABR (small-box IBP accuracy
#: in CTBench) and TAPS/STAPS (the TAPS estimate) the PGD accuracy.
ROBUST_ACCU = {"fast": "ibp_verified_acc", "ibp": "ibp_verified_acc",
               "crown_ibp": "crown_ibp_verified_acc", "pgd": "pgd_acc", "sabr": "pgd_acc",
               "taps": "pgd_acc", "staps": "pgd_acc"}

#: Data-set constants of CTBench's networks (normalisation layer) and loaders.
DATA = {"mnist": {"data.mean": [0.1307], "data.std": [0.3081]},
        "cifar10": {"data.mean": [0.4914, 0.4822, 0.4465], "data.std": [0.2023, 0.1994, 0.201],
                    "data.crop_padding": 2, "data.augment": True},
        "tinyimagenet": {"data.augment": True}}

INPUT_ATTACK = {"pgd", "mtl_ibp", "cc_ibp", "exp_ibp", "sabr", "staps"}


def _pgd_step(t: int) -> float:
    """CTBench's PGD/MTL step: max(0.25, 2/T) of the half-width (model_wrapper.py)."""
    return max(0.25, 2 / t)


def _latent_decay(t: int) -> list[int]:
    """CTBench's TAPS latent schedule (_MultiPGDMixin.select_schedule): the steps from which
    the step is ×0.2."""
    if 10 <= t <= 50:
        return [int(0.7 * t)]
    if 50 < t <= 80:
        return [int(0.4 * t), int(0.7 * t)]
    if t > 80:
        return [int(0.3 * t), int(0.6 * t), int(0.8 * t)]
    return []


def _attacks(t: int, s: Script) -> dict:
    """--train-steps T: the input attack (PGD, MTL/CC/Exp: T steps of max(0.25, 2/T); SABR
    and STAPS's centre search: adv_whitebox's default 0.2), the TAPS latent search
    (max(0.2, 2/T) × the full width = 2·max(0.2, 2/T) half-widths, ×0.2 decay), EDAC's."""
    out = {}
    if s.method in INPUT_ATTACK:
        step = 0.2 if s.method in ("sabr", "staps") else _pgd_step(t)
        out.update({"method.attack.steps": t, "method.attack.step_size": pytest.approx(step),
                    "method.attack.loss": "ce", "method.attack.random_start": True})
    if s.method in ("taps", "staps"):
        decay = _latent_decay(t)
        out.update({"method.latent_attack.steps": t, "method.latent_attack.loss": "margin",
                    "method.latent_attack.step_size": pytest.approx(2 * max(0.2, 2 / t)),
                    "method.latent_attack.decay_at": decay})
        if decay:
            out["method.latent_attack.step_decay"] = pytest.approx(0.2)
    if s.get("use-EDAC-step"):
        out.update({"aids.edac.attack.steps": t, "aids.edac.attack.loss": "ce",
                    "aids.edac.attack.step_size": pytest.approx(_pgd_step(t))})
    return out


def _restarts(r: int, s: Script) -> dict:
    out = {}
    if s.method in INPUT_ATTACK:
        out["method.attack.restarts"] = r
    if s.method in ("taps", "staps"):
        out["method.latent_attack.restarts"] = r
    if s.get("use-EDAC-step"):
        out["aids.edac.attack.restarts"] = r
    return out


def _selection(v, s: Script) -> dict:
    if v is None:
        return {"select.metric": None}
    return {"select.metric": ROBUST_ACCU[s.method], "select.split": "test"}


def _warmup(v, s: Script) -> dict:
    """--fast-reg λ0 (warmup weight λ0·(1 - ε/ε_train) during the ramp); the ``ibp`` preset is
    train_ibp.sh without it on purpose (vanilla IBP)."""
    return {} if s.method == "ibp" else {"method.warmup.lambda0": pytest.approx(v)}


#: flag → (value, script) → {composed key: expected value}.
MAPPING = {
    "dataset": lambda v, s: {"data.name": v, **DATA[v]},
    "net": lambda v, s: {"model.name": "cnn7", "model.bn": "full", "model.width": 1.0,
                         "model.strides": None},
    "train-eps": lambda v, s: {"eps": pytest.approx(v, rel=1e-4)},   # CTBench rounds 3/255...
    "test-eps": lambda v, s: {"eval.eps": pytest.approx(v, rel=1e-4)},
    "train-batch": lambda v, s: {"data.batch_size": v},
    "n-epochs": lambda v, s: {"epochs": v},
    "start-epoch-eps": lambda v, s: {"schedule.start": v, "schedule.name": "smoothed",
                                     "schedule.mid": 0.25, "schedule.exponent": 4.0},
    "end-epoch-eps": lambda v, s: {"schedule.length": v - s.get("start-epoch-eps")},
    "lr": lambda v, s: {"optim.name": "adam", "optim.lr": pytest.approx(v),
                        "optim.gamma": s.get("lr-decay-factor")},
    "lr-milestones": lambda v, s: {"optim.milestones": v},
    "grad-clip": lambda v, s: {"optim.grad_clip": v},
    "grad-accu-batch": lambda v, s: (
        {"optim.grad_acc_steps": 1} if v is None else
        {"optim.grad_acc_steps": math.ceil(s.get("train-batch") / v),
         "optim.grad_acc_bn": "batch"}),
    "start-value-robust-weight": lambda v, s: {"method.kappa.start": pytest.approx(1 - v)},
    "end-value-robust-weight": lambda v, s: {"method.kappa.end": pytest.approx(1 - v)},
    "fast-reg": _warmup,
    "eps-shrinkage": lambda v, s: {"method.lam": pytest.approx(v)},
    "block-sizes": lambda v, s: {"method.head_blocks": HEAD_BLOCKS[v[1]]},
    "taps-grad-scale": lambda v, s: {"method.grad_scale": pytest.approx(v)},
    "soft-thre": lambda v, s: {"method.soft_threshold": pytest.approx(v)},
    "ibp-coef": lambda v, s: {"method.alpha": pytest.approx(v)},
    "attack-range-scale": lambda v, s: (
        {"method.attack_eps_factor": pytest.approx(v)} if s.method.endswith("_ibp") and
        s.method != "crown_ibp" else {}),
    "train-steps": lambda v, s: _attacks(v, s),
    "restarts": lambda v, s: _restarts(v, s),
    "init": lambda v, s: ({"init.name": "ibp"} if v == "fast" else
                          {"init.name": "kaiming_uniform", "init.zero_bias": False}),
    "use-loss-fusion": lambda v, s: ({"method.loss_fusion": v} if s.method == "crown_ibp"
                                     else {}),
    "L1-reg": lambda v, s: {"aids.l1": pytest.approx(v)},
    "use-pop-bn-stats": lambda v, s: {"aids.precise_bn": v},
    "use-swa": lambda v, s: {"aids.swa.start": s.get("swa-start") if v else None,
                             "aids.swa.every": s.get("swa-freq")},
    "relu-shrinkage": lambda v, s: {"aids.relu_shrinkage": v},
    "use-EDAC-step": lambda v, s: {"aids.edac.gamma": pytest.approx(
        s.get("EDAC-step-size") if v else 0.0)},
    "model-selection": _selection,
}

#: What CTBench's code does for every script of a method (no flag): SABR/STAPS search with
#: the clean batch's BatchNorm statistics (SmallBoxModelWrapper), CROWN-IBP bounds unmixed.
IMPLIED = {"sabr": {"method.search_bn": "clean"}, "staps": {"method.search_bn": "clean"},
           "crown_ibp": {"method.beta_start": 1.0, "method.beta_end": 1.0}}

#: The presets CTBench has no script for: De Palma et al.'s README commands
#: (alessandrodepalma/expressive-losses 3df64fa, README.md line), schedule start=s,length=l →
#: schedule.start = s - 1; no precise BN, SWA or selection; MNIST unnormalised.
DE_PALMA = {
    "cifar10_2/cc_ibp": {"_line": 151, "method.alpha": 0.01, "aids.l1": 3e-6,
                         "method.attack.steps": 8, "method.attack.step_size": 0.25,
                         "method.attack_eps_factor": 2.1, "epochs": 160, "schedule.start": 1,
                         "schedule.length": 80, "optim.milestones": [120, 140]},
    "cifar10_2/exp_ibp": {"_line": 155, "method.alpha": 0.095, "aids.l1": 4e-6,
                          "method.attack.steps": 8, "method.attack.step_size": 0.25,
                          "method.attack_eps_factor": 2.1, "epochs": 160, "schedule.start": 1,
                          "schedule.length": 80, "optim.milestones": [120, 140]},
    "cifar10_8/cc_ibp": {"_line": 165, "method.alpha": 0.5, "aids.l1": 0.0,
                         "method.attack.steps": 1, "method.attack.step_size": 10.0,
                         "method.attack_eps_factor": 1.0, "epochs": 260, "schedule.start": 1,
                         "schedule.length": 80, "optim.milestones": [180, 220]},
    "cifar10_8/exp_ibp": {"_line": 169, "method.alpha": 0.5, "aids.l1": 0.0,
                          "method.attack.steps": 1, "method.attack.step_size": 10.0,
                          "method.attack_eps_factor": 1.0, "epochs": 260, "schedule.start": 1,
                          "schedule.length": 80, "optim.milestones": [180, 220]},
    "mnist_0_3/cc_ibp": {"_line": 138, "method.alpha": 0.3, "aids.l1": 3e-6,
                         "eps": 0.3 * 1.334, "eval.eps": 0.3, "method.attack.steps": 1,
                         "method.attack.step_size": 10.0, "method.attack_eps_factor": 1.0,
                         "epochs": 70, "schedule.start": 0, "schedule.length": 20,
                         "optim.milestones": [50, 60], "data.mean": [0.0], "data.std": [1.0]},
    "mnist_0_3/exp_ibp": {"_line": None, "eps": 0.3 * 1.334, "eval.eps": 0.3,
                          "method.attack.steps": 1, "method.attack.step_size": 10.0,
                          "data.mean": [0.0], "data.std": [1.0]},
}
DE_PALMA_COMMON = {"method.kappa.start": 0.0, "method.kappa.end": 0.0, "method.attack.restarts": 1,
                   "aids.precise_bn": False, "aids.swa.start": None, "select.metric": None,
                   "optim.lr": 5e-4, "optim.gamma": 0.2, "optim.grad_clip": 10.0}


def _composed(preset: str) -> dict:
    cfg = compose_config("config", [f"experiment=ctbench/{preset}"])
    return OmegaConf.to_container(cfg, resolve=True)


def _select(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "<missing>"
        tree = tree[part]
    return tree


def _expected(script: Script) -> dict:
    """Every composed key the script's flags and CTBench's defaults fix, and its value."""
    want = {}
    for flag in set(script.flags) | set(DEFAULTS):
        if flag in IRRELEVANT or flag in {f for fs in METHOD_FLAGS for f in fs}:
            continue
        if flag not in MAPPING:
            if flag in DEFAULTS:
                continue  # a default read by another flag's mapping
            raise AssertionError(f"{script.preset}: flag --{flag} has no fastcert key in "
                                 f"MAPPING (nor a reason in IRRELEVANT)")
        want.update(MAPPING[flag](script.get(flag), script))
    want.update(IMPLIED.get(script.method, {}))
    return want


def _script_cases() -> list[tuple[Path, str]]:
    cases = []
    for path in TRANSCRIPTIONS:
        for preset in yaml.safe_load(path.read_text())["presets"]:
            cases.append((path, preset.removeprefix("ctbench/")))
    return cases


def _read(path: Path, preset: str) -> Script:
    data = yaml.safe_load(path.read_text())
    flags = {data.get("abbreviations", {}).get(k, k): v for k, v in data["flags"].items()}
    return Script(flags, preset.split("/")[1], preset)


def test_every_ctbench_preset_has_a_script_or_a_de_palma_recipe():
    presets = {p.removeprefix("ctbench/") for p in options("experiment")
               if p.startswith("ctbench/")}
    scripted = {preset for _, preset in _script_cases()}
    assert len(TRANSCRIPTIONS) == 39 and len(scripted) == 44
    assert scripted.isdisjoint(DE_PALMA) and presets == scripted | set(DE_PALMA)


@pytest.mark.parametrize("path,preset", _script_cases(), ids=lambda v: getattr(v, "stem", v))
def test_preset_matches_its_script(path, preset):
    script = _read(path, preset)
    methods = METHOD_FLAGS[frozenset(f for f in script.flags
                                     if f in {g for fs in METHOD_FLAGS for g in fs})]
    assert script.method in methods
    cfg = _composed(preset)
    assert cfg["method"]["name"] == script.method
    drift = {key: (_select(cfg, key), want) for key, want in _expected(script).items()
             if _select(cfg, key) != want}
    assert not drift, f"ctbench/{preset} drifted from {path.name}: {{key: (preset, script)}} " \
                      f"{drift}"


@pytest.mark.parametrize("preset", sorted(DE_PALMA))
def test_script_less_presets_follow_de_palma(preset):
    cfg = _composed(preset)
    want = {k: v for k, v in {**DE_PALMA_COMMON, **DE_PALMA[preset]}.items() if k != "_line"}
    drift = {k: (_select(cfg, k), v) for k, v in want.items()
             if _select(cfg, k) != (pytest.approx(v) if isinstance(v, float) else v)}
    assert not drift, drift


def test_a_drifting_preset_or_an_unmapped_flag_fails():
    path = SCRIPTS / "cifar10_2" / "sabr.yaml"
    script = _read(path, "cifar10_2/sabr")
    cfg = _composed("cifar10_2/sabr")
    cfg["aids"]["l1"] = 2e-6
    assert _select(cfg, "aids.l1") != _expected(script)["aids.l1"]
    script.flags["new-flag"] = 1
    with pytest.raises(AssertionError, match="--new-flag has no fastcert key"):
        _expected(script)


def _doc_rows() -> dict[str, list[str]]:
    """docs/papers/ctbench.md's preset table: ``setting/method`` → its cells."""
    doc = Path(__file__).parents[1] / "docs" / "papers" / "ctbench.md"
    rows = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] in {p.parent.name for p in TRANSCRIPTIONS}:
            rows[f"{cells[0]}/{cells[1]}"] = cells
    return rows


def test_the_docs_table_says_each_presets_aids():
    """Each row of docs/papers/ctbench.md's preset table states its preset's aids and
    selection as composed."""
    rows = _doc_rows()
    assert len(rows) == 50
    for preset, (_, _, _, l1, bn, swa, shrink, edac, select, _) in rows.items():
        cfg = _composed(preset)
        aids, sel = cfg["aids"], cfg["select"]
        assert float(l1) == aids["l1"], preset
        assert bn == ("yes" if aids["precise_bn"] else "no"), preset
        assert swa == ("–" if aids["swa"]["start"] is None else str(aids["swa"]["start"])), preset
        assert shrink == ("–" if aids["relu_shrinkage"] is None
                          else f"{aids['relu_shrinkage']:g}"), preset
        assert edac == ("–" if aids["edac"]["gamma"] == 0 else f"{aids['edac']['gamma']:g}"), \
            preset
        assert select == ("last" if sel["metric"] is None
                          else f"{sel['metric']} ({sel['split']})"), preset
