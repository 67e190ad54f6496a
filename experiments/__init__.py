"""Scripts that reproduce the papers' tables and figures (``python -m experiments.<name>``)."""
from __future__ import annotations

#: Methods the multi-method experiments (compare_methods, bench) run only when named with
#: ``--methods``: full-CROWN training (``method=crown``) bounds every intermediate layer by its own
#: backward pass: ~100x an IBP epoch on cnn_small (measured: ~56 s vs ~0.5 s per digits epoch),
#: beyond a training step on CNN-7 at CIFAR shapes.
EXPENSIVE_METHODS = ("crown",)


def default_methods() -> list[str]:
    """Every ``conf/method`` option but :data:`EXPENSIVE_METHODS`."""
    from fastcert.config import options

    return [m for m in options("method") if m not in EXPENSIVE_METHODS]
