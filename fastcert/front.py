"""Pareto dominance between objective vectors (clean and certified accuracy, or any others).

With every objective maximised, a point a *dominates* b when it is at least as good in every
objective and better in one:

    a ≻ b  ⇔  a_i ≥ b_i for all i  and  a_j > b_j for some j

(the usual definition, e.g. Deb, *Multi-Objective Optimization using Evolutionary Algorithms*,
2001; the rule of CTRAIN's ``_constrained_pareto_trials``). The *front* of a set
of points is the set of its non-dominated points. Equal points do not dominate each other, so
ties are all on the front. A minimised objective is negated first (``directions``).
"""
from __future__ import annotations

from collections.abc import Sequence

DIRECTIONS = ("maximize", "minimize")


def oriented(point: Sequence[float], directions: Sequence[str]) -> list[float]:
    """``point`` with each minimised objective negated (every objective then maximised)."""
    if len(point) != len(directions):
        raise ValueError(f"{len(point)} values for {len(directions)} objectives")
    out = []
    for value, direction in zip(point, directions):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: use maximize or minimize")
        out.append(float(value) if direction == "maximize" else -float(value))
    return out


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str] | None = None,
              margin: float = 0.0) -> bool:
    """Whether ``a`` dominates ``b`` shifted by ``margin`` in every objective (towards
    better): ``a ≻ b + margin·1`` after :func:`oriented` (margin 0: plain dominance)."""
    directions = directions or ["maximize"] * len(a)
    a, b = oriented(a, directions), oriented(b, directions)
    shifted = [v + margin for v in b]
    return (all(x >= y for x, y in zip(a, shifted, strict=True))
            and any(x > y for x, y in zip(a, shifted)))


def non_dominated(points: Sequence[Sequence[float]],
                  directions: Sequence[str] | None = None) -> list[bool]:
    """For each point, whether no other point dominates it (ties are all kept)."""
    return [not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)
            for i, p in enumerate(points)]
