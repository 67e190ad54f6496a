"""Config nodes → objects, checked before anything trains.

Every config group option (``conf/<group>/<option>.yaml``; ``conf/`` is the package's
``fastcert/conf``, :data:`CONF_DIR`) is one node: ``name`` (the option's label, used in run
names, tables and W&B), ``_target_`` (the class or function it builds) and that target's
arguments. :func:`instantiate` is the one way nodes become objects: it checks every
key against the target's signature (an unknown key is refused with the nearest valid one and the
full list), coerces each value to its annotated type (so ``optim.lr=abc`` is refused naming the
key, and ``eps=8/255`` reads as a fraction), then calls ``hydra.utils.instantiate``. The config
groups themselves are the registry: :func:`options` lists a group's options, as the CLI does.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Union

#: The Hydra config tree shipped inside the package (``fastcert/conf``).
CONF_DIR = Path(__file__).resolve().parent / "conf"
#: Keys of a node that are not arguments of its target.
META_KEYS = ("name", "_target_")


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what to type."""


# --------------------------------------------------------------------------- the registry


def options(group: str) -> list[str]:
    """The options of a config group, as ``group=<option>`` takes them (sub-folders included,
    e.g. ``ctbench/cifar10_2/sabr`` for ``experiment``)."""
    base = CONF_DIR / group
    return sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.yaml"))


def option_node(group: str, option: str) -> Mapping[str, Any]:
    """The node ``conf/<group>/<option>.yaml`` defines (for a ``# @package _global_`` file, its
    ``<group>`` entry; without the file's ``defaults`` list, which selects other groups), as a
    plain dict; tools and experiments build from it without Hydra. Its ``${paths.*}``
    interpolations resolve against ``conf/paths/default.yaml``, as in a composed run config."""
    from omegaconf import OmegaConf

    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(f"{group}={option}: no such option; choose one of {options(group)}")
    node = OmegaConf.load(path)
    if "_target_" not in node and group in node:
        node = node[group]
    tree = OmegaConf.create({"paths": OmegaConf.load(CONF_DIR / "paths" / "default.yaml"),
                             "node": node})
    return {k: v for k, v in OmegaConf.to_container(tree.node, resolve=True).items()
            if k != "defaults"}


def build_option(group: str, option: str, overrides: Mapping[str, Any] | None = None,
                 **runtime: Any) -> Any:
    """Build ``conf/<group>/<option>.yaml`` with ``overrides`` of its keys (checked like the
    command line's) and ``runtime`` arguments (see :func:`instantiate`)."""
    node = {**option_node(group, option), **(overrides or {})}
    return instantiate(node, where=group, **runtime)


# --------------------------------------------------------------------------- values


def parse_number(value: Any, where: str) -> float:
    """A float from a config value: a number, or a string such as ``"1e-3"`` or ``"8/255"``
    (radii are written as fractions of the pixel range)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}={value}: expected a number, e.g. 0.1 or 8/255")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{where}={value!r}: expected a number, e.g. 0.1 or 8/255")


def _parse_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}={value}: expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ConfigError(f"{where}={value!r}: expected an integer, e.g. {where.split('.')[-1]}=10")


def _parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{where}={value!r}: expected true or false")


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against a type annotation (float, int, bool, str, Literal, Optional,
    list/tuple/Sequence of these, a dataclass given as a mapping, Any); raises
    :class:`ConfigError` naming ``where`` and what to type."""
    if annotation in (Any, inspect.Parameter.empty, object):
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, where)
    if value is None:
        raise ConfigError(f"{where}=null: a value is required")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}={value!r}: choose one of {', '.join(map(str, args))}")
    for kind, parse in _SCALARS:
        if annotation is kind:
            return parse(value, where)
    if origin in (list, tuple, Sequence, typing.Sequence) or annotation in (list, tuple):
        if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
            value = _as_list(value, where)
        inner = args[0] if args else Any
        items = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
        return instantiate({"_target_": annotation, **value}, where=where)
    return value


def _coerce_union(value: Any, args: tuple, where: str) -> Any:
    """``value`` as the first member of a Union (Optional included) that takes it; the first
    member's error when none does."""
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}=null: a value is required")
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return coerce(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0])


def _parse_str(value: Any, where: str) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        raise ConfigError(f"{where}={value!r}: expected a single value")
    return str(value)


#: The scalar annotations :func:`coerce` reads, and how.
_SCALARS = ((float, parse_number), (int, _parse_int), (bool, _parse_bool), (str, _parse_str))


def _as_list(value: Any, where: str) -> list:
    from omegaconf import ListConfig

    if isinstance(value, ListConfig):
        return list(value)
    raise ConfigError(f"{where}={value!r}: expected a list, e.g. {where.split('.')[-1]}=[1,2]")


# --------------------------------------------------------------------------- instantiate


def _target(node: Mapping[str, Any], where: str):
    import hydra.utils

    target = node.get("_target_")
    if target is None:
        raise ConfigError(f"{where}: the config node has no _target_ (the class it builds)")
    if not isinstance(target, str):
        return target
    try:
        return hydra.utils.get_object(target)
    except Exception as e:  # noqa: BLE001 - hydra wraps import errors in several types
        raise ConfigError(f"{where}._target_={target}: cannot import it ({e})") from e


def parameters(target) -> dict[str, tuple[Any, Any]]:
    """``{argument: (annotation, default)}`` of a class or function (a dataclass: its init
    fields), with string annotations resolved."""
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        out = {}
        for f in dataclasses.fields(target):
            if not f.init:
                continue
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else inspect.Parameter.empty)
            out[f.name] = (hints.get(f.name, Any), default)
        return out
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type checks
        hints = {}
    sig = inspect.signature(fn)
    return {p.name: (hints.get(p.name, Any), p.default) for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def unknown_key_error(key: str, valid: Sequence[str], where: str) -> ConfigError:
    """'<where>.<key>' is not a key: the nearest valid one, and all of them."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"did you mean {where}.{close[0]}? " if close else ""
    return ConfigError(f"{where}.{key} is not a key of {where}: {hint}"
                       f"valid keys: {', '.join(sorted(valid))}")


def check_node(node: Mapping[str, Any], where: str, runtime: Sequence[str] = ()) -> dict:
    """The node's arguments, each checked and coerced against its target's signature
    (``runtime`` names arguments supplied by the code, not the config)."""
    target = _target(node, where)
    params = parameters(target)
    settable = {k: v for k, v in params.items() if k not in runtime}
    out = {}
    for key, value in node.items():
        if key in META_KEYS:
            continue
        if key not in settable:
            raise unknown_key_error(key, settable, where)
        annotation = settable[key][0]
        if _is_node(value):
            value = instantiate(value, where=f"{where}.{key}")
        out[key] = coerce(value, annotation, f"{where}.{key}")
    missing = [k for k, (_, d) in settable.items() if d is inspect.Parameter.empty and k not in out]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    return out


def _is_node(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def instantiate(node: Mapping[str, Any], where: str, **runtime: Any) -> Any:
    """Build ``node`` (a DictConfig or dict with ``_target_``) after :func:`check_node`;
    ``runtime`` are the arguments the code supplies (a model's input shape, a logger's run
    dir ...), passed as they are. A ``ValueError``/``TypeError`` the target raises on its
    values becomes a :class:`ConfigError` naming ``where``."""
    import hydra.utils
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    args = {**check_node(node, where, runtime=list(runtime)), **runtime}
    target = node["_target_"]
    # _partial_: Hydra resolves the target; the checked arguments are passed as Python
    # objects (Hydra would turn dataclass values and tuples into configs and lists)
    build = hydra.utils.instantiate({"_target_": target if isinstance(target, str) else
                                     f"{target.__module__}.{target.__qualname__}",
                                     "_partial_": True})
    try:
        return build(**args)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e


def check_keys(values: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    """Refuse keys of ``values`` outside ``valid`` (a top-level ``+epoch=3``), naming the
    nearest valid key."""
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}=...?" if close else ""
            raise ConfigError(f"{key} is not a {where} key{hint} Valid keys: "
                              f"{', '.join(sorted(valid))}")
