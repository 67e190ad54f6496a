"""Attacks: certify's default (strong) attack is an honest upper bound of robust accuracy —
on the default checkpoint it breaks everything a 20-restart × 200-step reference attack
(margin and CE losses, box-corner starts) breaks — while the cheap PGD of the per-epoch and
training-end metrics keeps its interface; attacks never leave the box."""
from __future__ import annotations

import pytest
import torch

from fastcert.attacks import AttackResult, PGDConfig, StrongAttack, apgd_checkpoints, pgd_attack
from fastcert.config import instantiate

from conftest import compose_config

EPS = 0.2
SUBSET = 120  # fixed: the first 120 test digits of seed 0


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory):
    """The default config (digits, MLP 256-256, IBP, ε = 0.1) trained for 40 epochs instead of
    150 (warmup 5 + 25): its model, test inputs, labels and ε = 0.2 boxes."""
    from fastcert.pipeline import build, run
    from fastcert.settings import validate

    cfg = compose_config("config", ["device=cpu", "epochs=40", "schedule.start=5",
                                    "schedule.length=25", "eval.verifiers=[ibp]"])
    run_dir = tmp_path_factory.mktemp("default")
    run(cfg, run_dir)
    state = torch.load(run_dir / "last.pt", weights_only=False)
    built = build(validate(cfg), torch.device("cpu"))
    built.net.model.load_state_dict(state["model"])
    model = built.net.model.eval()
    x, y = map(torch.cat, zip(*built.data.test))
    x, y = x[:SUBSET], y[:SUBSET]
    lower, upper = built.data.eps_box(x, EPS)
    return model, x, y, lower, upper


def _certify_default_attack():
    cfg = compose_config("certify", ["checkpoint=unused"])
    return instantiate(cfg.attack, "attack")


def test_default_attack_breaks_everything_the_reference_breaks(default_checkpoint):
    model, x, y, lower, upper = default_checkpoint
    attack = _certify_default_attack()
    assert isinstance(attack, StrongAttack)
    strong = attack.run(model, x, y, lower, upper, torch.Generator().manual_seed(0))
    reference = torch.ones_like(y, dtype=torch.bool)
    for loss in ("margin", "ce"):
        ref = PGDConfig(steps=200, restarts=20, step_size=0.1, loss=loss, start="corner")
        reference &= ref.run(model, x, y, lower, upper, torch.Generator().manual_seed(1)).robust
    cheap = PGDConfig(steps=200, restarts=1, step_size=2.5 / 200).run(
        model, x, y, lower, upper, torch.Generator().manual_seed(0)).robust
    missed = torch.nonzero(strong.robust & ~reference).flatten().tolist()
    assert not missed, f"broken by the reference, not by certify's attack: {missed}"
    assert int((~reference).sum()) > int((~cheap).sum())   # the reference is not vacuous
    print(f"robust: PGD-200x1 {cheap.float().mean():.3f}, reference {reference.float().mean():.3f},"
          f" strong {strong.robust.float().mean():.3f}")


@pytest.mark.parametrize("attack", [PGDConfig(steps=5, restarts=2, start="corner"),
                                    StrongAttack(steps=5, targets=2, restarts=2,
                                                 restart_steps=5)],
                         ids=["pgd", "strong"])
def test_attacks_stay_in_the_box_and_report_the_margin_they_saw(default_checkpoint, attack):
    model, x, y, lower, upper = default_checkpoint
    result = attack.run(model, x, y, lower, upper, torch.Generator().manual_seed(0))
    assert isinstance(result, AttackResult)
    assert bool(((result.x_adv >= lower) & (result.x_adv <= upper)).all())
    with torch.no_grad():
        logits = model(x)
        clean_margin = logits.gather(1, y[:, None]).squeeze(1) - logits.scatter(
            1, y[:, None], float("-inf")).max(1).values
    assert bool((result.margin <= clean_margin + 1e-6).all())   # the clean input counts
    assert torch.equal(result.robust, result.margin > 0)


def test_pgd_attack_keeps_its_interface(default_checkpoint):
    """Training methods call pgd_attack(model, x, y, lower, upper, PGDConfig(...), generator)
    with loss='ce'/'margin' and random_start: (robust, x_adv) as before."""
    model, x, y, lower, upper = default_checkpoint
    for cfg in (PGDConfig(steps=3, loss="ce", random_start=False), PGDConfig(steps=3)):
        robust, x_adv = pgd_attack(model, x, y, lower, upper, cfg,
                                   generator=torch.Generator().manual_seed(0))
        assert robust.dtype == torch.bool and x_adv.shape == x.shape


def test_apgd_checkpoints():
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein 2020)."""
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
