"""What the experiment scripts share: the run config composed in this process, and mean ± std
cells of their tables."""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from omegaconf import DictConfig


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml with ``overrides``, composed in this process as ``python -m
    fastcert.run`` composes it (Hydra's global state is cleared before and after)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fastcert.config import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def mean_and_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: Iterable[float | None], *, scale: float = 1.0, digits: int = 4,
             empty: str = "-", bare_single: bool = False) -> str:
    """``mean ± std`` (sample std) of the values that are not None, each times ``scale``, with
    ``digits`` decimals; ``empty`` when there is none; a single value shows std 0, or alone
    when ``bare_single``."""
    values = [scale * v for v in values if v is not None]
    if not values:
        return empty
    if len(values) == 1 and bare_single:
        return f"{values[0]:.{digits}f}"
    mean, std = mean_and_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
