"""The search space of a sweep: Hydra's sweep syntax turned into Optuna distributions, sampled
define-by-run (one trial at a time, through ``Trial.suggest_*``), so that a branch's parameters
exist only in the trials that chose it.

Syntax of an entry ``key: value`` of ``hydra.sweeper.params`` (or of one option under
``hydra.sweeper.branch.options``), as hydra-optuna-sweeper read it:

=================================  ==========================================================
``choice(a, b, c)``                categorical (a config group too: ``optim: choice(adam,
                                   adamw)``)
``range(lo, hi)``                  integers lo … hi, **both ends included**;
                                   ``range(lo, hi, step=s)`` every s-th; floats: a grid
``interval(lo, hi)``               a float in [lo, hi]
``tag(log, interval(lo, hi))``     log-uniform (``tag(log, range(lo, hi))``: integers)
anything else                      a fixed value, passed to every trial as it is
=================================  ==========================================================

A branch (``hydra.sweeper.branch``: ``key`` and ``options``) is a categorical parameter named
``key`` sampled first, then the parameters of the chosen option, named ``<option>:<key>`` in
the study (CTRAIN's ``<method>:<hp>``), e.g. ``method`` with ``options: {sabr: {method.lam:
...}, mtl_ibp: {method.alpha: ...}}``.

Command-line overrides win over the config: a sweep (``schedule.length=range(1,2)``) replaces
the entry of that key (in the branches that have it, else the shared parameters), a plain value
fixes the key in every trial, and a value or sweep of the branch key chooses among its options.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class SpaceError(ValueError):
    """A search-space entry that cannot be sampled (the message names the key)."""


@dataclass(frozen=True)
class Param:
    """One entry: ``key`` as an override (with its ``+``/``++`` prefix), ``name`` in the
    study; ``distribution`` None for a fixed ``value`` (the override's text)."""

    key: str
    name: str
    distribution: Any = None
    value: str | None = None

    def override(self, sampled: Any = None) -> str:
        return f"{self.key}={self.value if self.distribution is None else text(sampled)}"


def text(value: Any) -> str:
    """A sampled value as Hydra override text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse(key: str, value: Any):
    """Hydra's parsed override of ``key=value``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    if isinstance(value, bool) or value is None:
        value = text(value)
    if not isinstance(value, (str, int, float)):
        raise SpaceError(f"hydra.sweeper.params.{key}={value!r}: write the value or sweep as "
                         f"one string, e.g. 'interval(0.1, 0.5)'")
    try:
        return OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
    except OverrideParseException as e:
        raise SpaceError(f"{key}={value}: {e}") from None


def distribution(override) -> Any:
    """The Optuna distribution of a sweep override (module docstring)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    value, key = override.value(), override.get_key_element()
    log = "log" in value.tags
    if override.is_choice_sweep():
        if log:
            raise SpaceError(f"{key}: tag(log, ...) needs a range or an interval")
        return CategoricalDistribution(
            list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(v, int) for v in (start, stop, step)):
            return IntDistribution(start, stop, log=log, step=1 if log else step)
        return FloatDistribution(float(start), float(stop), log=log,
                                 step=None if log else float(step))
    if override.is_interval_sweep():
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise SpaceError(f"{override.input_line}: use choice(...), range(...) or interval(...)")


def param(key: str, value: Any, prefix: str = "") -> Param:
    """One entry of the space; ``prefix`` names it in a branch (``sabr:``)."""
    override = _parse(key, value)
    name = prefix + override.get_key_element().lstrip("+~")
    if not override.is_sweep_override():
        return Param(override.get_key_element(), name,
                     value=override.get_value_element_as_str())
    try:
        return Param(override.get_key_element(), name, distribution(override))
    except ValueError as e:
        raise SpaceError(f"{override.input_line}: {e}") from None


def suggest(trial, p: Param) -> Any:
    """``p``'s value in ``trial`` (its fixed value: None)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    d = p.distribution
    if d is None:
        return None
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(p.name, list(d.choices))
    if isinstance(d, IntDistribution):
        return trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(p.name, d.low, d.high, step=d.step, log=d.log)


def _entries(node: Mapping | None, prefix: str = "") -> list[Param]:
    return [param(str(k), v, prefix) for k, v in (node or {}).items()]


@dataclass
class Space:
    """The shared parameters, and a branch (its key and each option's parameters)."""

    shared: list[Param] = field(default_factory=list)
    branch_key: str | None = None
    branches: dict[str, list[Param]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, params: Mapping | None, branch: Mapping | None) -> Space:
        branch = branch or {}
        key = branch.get("key")
        options = branch.get("options") or {}
        if bool(key) != bool(options):
            raise SpaceError("hydra.sweeper.branch needs both key (e.g. method) and options")
        return cls(_entries(params), key,
                   {str(o): _entries(v, f"{o}:") for o, v in options.items()})

    def apply_command_line(self, arguments: list[str]) -> list[str]:
        """Fold the command line's overrides into the space (module docstring); returns the
        fixed overrides every trial gets."""
        fixed = []
        for line in arguments:
            if "=" not in line:  # ~key: a deletion
                fixed.append(line)
                continue
            key, _, value = line.partition("=")
            bare = key.lstrip("+~")
            if self.branch_key is not None and bare == self.branch_key:
                self._choose_options(_parse(key, value))
                continue
            p = param(key, value)
            in_branches = [o for o, ps in self.branches.items() if any(
                q.key.lstrip("+~") == bare for q in ps)]
            self.shared = [q for q in self.shared if q.key.lstrip("+~") != bare]
            for o in in_branches:
                self.branches[o] = [q for q in self.branches[o] if q.key.lstrip("+~") != bare]
            if p.distribution is None:
                fixed.append(line)
            elif in_branches:
                for o in in_branches:
                    self.branches[o].append(param(key, value, f"{o}:"))
            else:
                self.shared.append(p)
        return fixed

    def _choose_options(self, override) -> None:
        """The branch key given on the command line: its value(s) are the options to search."""
        from hydra.core.override_parser.types import Transformer

        chosen = (list(override.sweep_iterator(transformer=Transformer.encode))
                  if override.is_sweep_override() else [override.get_value_element_as_str()])
        unknown = [c for c in chosen if c not in self.branches]
        if unknown or override.is_range_sweep() or override.is_interval_sweep():
            raise SpaceError(f"{override.input_line}: choose among the branch's options "
                             f"{', '.join(self.branches)} (e.g. {self.branch_key}="
                             f"{','.join(list(self.branches)[:2])})")
        self.branches = {o: self.branches[o] for o in chosen}

    def sample(self, trial) -> list[str]:
        """The overrides of one trial: shared parameters, then the branch and its options'."""
        out = [p.override(suggest(trial, p)) for p in self.shared]
        if self.branch_key is not None:
            option = trial.suggest_categorical(self.branch_key, list(self.branches))
            out.append(f"{self.branch_key}={option}")
            out += [p.override(suggest(trial, p)) for p in self.branches[option]]
        return out
