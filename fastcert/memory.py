"""Keep freed memory in the process on CPU runs (glibc ``mallopt`` at start-up).

A training step allocates and frees the same large buffers every step (activations, bound
tensors, gradients). glibc serves a request above ``M_MMAP_THRESHOLD`` (dynamic, at most
32 MiB on 64-bit) with its own ``mmap`` and unmaps it on ``free``, and trims the heap top above
``M_TRIM_THRESHOLD``: each step the same memory goes back to the kernel and is faulted in again,
page by page. Measured on a 2-core x86 CPU (CNN-7, batch 32, one thread): 50k-400k minor page
faults per step, 10-25 % of the wall time (``python -m experiments.allocators`` measures it).

:func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (every request comes from the heap, which
``free`` does not unmap) and ``M_TRIM_THRESHOLD = 1 GiB`` (freed heap memory stays mapped up to
1 GiB at the top), both documented in mallopt(3). The process's resident memory then stays at
its peak instead of falling between steps; what it allocates is unchanged.

Why ``mallopt`` and not jemalloc (``LD_PRELOAD`` with ``MALLOC_CONF=dirty_decay_ms:-1``): both
remove the faults and measured within noise of each other (docs/efficiency.md), but ``mallopt`` is
part of every glibc, needs no system package, and takes effect from inside the running process,
so it also reaches Hydra multirun jobs and spawned ranks; ``LD_PRELOAD`` must be set before the
interpreter starts (a re-exec of every entry point). Without glibc (macOS, musl) it does
nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt(3) parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Freed memory at the heap top kept mapped (bytes).
TRIM_THRESHOLD = 1 << 30

_applied = False


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory mapped (see the module docstring); True when applied
    (now or earlier in this process), False where the C library is not glibc."""
    global _applied
    if _applied:
        return True
    libc = _libc()
    if libc is None:
        log.info("not glibc: the allocator setting (keep_freed_memory) does nothing here")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = ok
    return ok


def applied() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process."""
    return _applied


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
