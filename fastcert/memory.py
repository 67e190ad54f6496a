"""The process's memory: glibc's allocator settings for training steps, the memory budget of
the bound computations, and resident-memory measurement.

Keep freed memory in the process during CPU training (glibc ``mallopt`` at start-up).

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

Kept memory pays in training steps only: an evaluation holds its peak instead of giving it back,
so :func:`release_freed_memory` restores glibc's thresholds and returns the freed memory
(``malloc_trim``) before every evaluation (:func:`fastcert.evaluate.evaluate`).

The memory budget (:class:`Budget`, ``memory_gb``): a bound computation runs its examples in
chunks small enough that the process's resident memory stays within the budget. ``memory_gb``
null means :func:`default_memory_gb`: a quarter of the machine's memory (the smaller of the
physical memory and the cgroup limit), e.g. 6 GiB on a 24 GiB machine shared by several
processes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: mallopt(3) parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_MMAP_THRESHOLD = -3
#: Freed memory at the heap top kept mapped (bytes).
TRIM_THRESHOLD = 1 << 30
#: glibc's defaults (mallopt(3)): 65536 mmap-ed regions at most; requests of 128 KiB and more are
#: mmap-ed; the heap top is trimmed above 128 KiB.
DEFAULT_MMAP_MAX = 65536
DEFAULT_THRESHOLD = 128 * 1024
#: The fraction of the machine's memory that ``memory_gb: null`` means.
DEFAULT_FRACTION = 0.25
GIB = 1 << 30
#: The working set a chunk is given at most, however large the budget: a larger chunk runs no
#: faster per example on a CPU, and only holds memory that other processes could use. Measured
#: on a 2-epoch cnn_small digits checkpoint, one thread: alpha-CROWN 0.23 s per example in
#: chunks of 16 (~230 MiB) and 0.22 s in one chunk of 244 (3.4 GiB); CROWN 4.9 s and 4.7 s for
#: 166 examples in chunks of 16 and 64. (On a GPU the bound tensors are not resident memory:
#: chunks are sized by the little host memory an example takes, so this rarely binds there.)
CHUNK_BYTES = 256 << 20
#: A chunk's rise per example raises the phase's working set only above this many times the
#: estimate: noise in the readings then leaves the chunk sizes (and alpha-CROWN's bounds, which
#: depend on how examples are grouped) as they were.
RAISE_ABOVE = 1.25

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


def release_freed_memory() -> bool:
    """Undo :func:`keep_freed_memory` (glibc's default thresholds; large requests mmap-ed and
    unmapped on ``free`` again) and return the freed memory to the kernel (:func:`trim`). True
    when the setting had been applied."""
    global _applied
    if not _applied:
        trim()
        return False
    libc = _libc()
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    for param, value in ((M_MMAP_MAX, DEFAULT_MMAP_MAX), (M_TRIM_THRESHOLD, DEFAULT_THRESHOLD),
                         (M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)):
        libc.mallopt(param, value)
    _applied = False
    trim()
    return True


def trim() -> None:
    """Return the freed heap memory to the kernel (glibc ``malloc_trim(0)``; nothing elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)


def applied() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process."""
    return _applied


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# --------------------------------------------------------------------------- measurement


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident memory now (``VmRSS``; 0 where /proc is missing)."""
    return 1024 * (_status_kib("VmRSS") or 0)


def peak_rss_bytes() -> int:
    """This process's peak resident memory since start or the last :func:`reset_peak`
    (``VmHWM``; elsewhere ``ru_maxrss``, never reset)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return 1024 * hwm
    import resource

    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> bool:
    """Start a new peak (:func:`peak_rss_bytes`) at the current resident memory: Linux resets
    ``VmHWM`` when 5 is written to /proc/self/clear_refs (proc(5)). False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the budget


def machine_memory_bytes() -> int:
    """The machine's memory as this process sees it: physical memory, or the cgroup (v2 or v1)
    limit where smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_memory_gb() -> float:
    """``memory_gb: null``: :data:`DEFAULT_FRACTION` of :func:`machine_memory_bytes`, in GiB."""
    return DEFAULT_FRACTION * machine_memory_bytes() / GIB


def check_memory_gb(value, key: str = "memory_gb") -> float | None:
    """``value`` as a budget in GiB (> 0) or None; a ValueError naming ``key`` otherwise."""
    if value is None:
        return None
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = float("nan")
    if not gb > 0 or gb == float("inf"):
        raise ValueError(f"{key}={value!r}: give the memory budget in GiB, e.g. {key}=8, "
                         f"or {key}=null for a quarter of this machine's memory")
    return gb


class Budget:
    """A memory budget for the bound computations, split into chunks of examples.

    Per phase (the attack, each verifier) the working set of one example, w, is measured on
    its second example (the first one warms up: lazy imports, first-call allocations): the
    rise of the peak resident memory over the resident memory before it, after the freed memory
    was returned (:func:`trim`). The phase then runs c = ⌊min(budget − r₀, CHUNK_BYTES)/w⌋
    examples at a time, rounded down to a power of two (r₀: the resident memory before the
    measurement; at least one example; :data:`CHUNK_BYTES`: what a CPU needs to run at full
    speed). Its peak is then r₀ + c·w ≤ budget when the working set grows linearly in the
    examples, as the bounds' tensors do (auto_LiRPA's CROWN holds B·spec·width coefficients).
    Where one example underestimates a chunk's working set per example (alpha-CROWN: 2.3x on
    a digits CNN), each chunk of :meth:`map` raises w to its own rise per example (when above
    :data:`RAISE_ABOVE` times w) for the chunks after it. The attack's chunks fix its random
    streams: they are sized once per test batch, by the budget alone (``cap=False``), so that
    a batch that fits runs as one chunk, as without a budget.

    alpha-CROWN's bounds depend on how the examples are grouped (auto_LiRPA stops a chunk's
    optimisation as a whole); the grouping comes from memory readings rounded down to powers of
    two, so it repeats on one machine, and every grouping's bounds are sound.
    """

    def __init__(self, memory_gb: float | None = None):
        self.gb = default_memory_gb() if memory_gb is None else check_memory_gb(memory_gb)
        self.bytes = int(self.gb * GIB)
        self.per_example: dict[str, int] = {}
        self.resident: dict[str, int] = {}
        #: per phase, the peak resident memory of its chunks (bytes)
        self.peaks: dict[str, int] = {}
        self.measurable = reset_peak()

    def run(self, phase: str, fn, size: int | None = None):
        """``fn()`` as one chunk of ``phase`` (of ``size`` examples), its peak resident memory
        recorded; with ``size``, its rise per example raises the phase's w where larger."""
        reset_peak()
        before = rss_bytes()
        out = fn()
        peak = peak_rss_bytes()
        self.peaks[phase] = max(self.peaks.get(phase, 0), peak)
        if size and phase in self.per_example:
            rise = (peak - before) // size
            if rise > RAISE_ABOVE * self.per_example[phase]:
                self.per_example[phase] = rise
        return out

    def chunk(self, phase: str, cap: bool = True) -> int | None:
        """The examples ``phase`` runs at a time (None: not measured yet, or unmeasurable);
        ``cap``: at most :data:`CHUNK_BYTES` of working set, else the budget alone."""
        if phase not in self.per_example:
            return None
        free = self.bytes - self.resident[phase]
        free = min(free, CHUNK_BYTES) if cap else free
        count = max(1, free // max(self.per_example[phase], 1))
        return 1 << (int(count).bit_length() - 1)

    def measure(self, phase: str, fn):
        """``fn()`` on one example, recording its working set; returns ``fn()``."""
        trim()
        reset_peak()
        before = rss_bytes()
        out = fn()
        peak = peak_rss_bytes()
        self.peaks[phase] = max(self.peaks.get(phase, 0), peak)
        self.per_example[phase] = max(peak - before, os.sysconf("SC_PAGE_SIZE"))
        self.resident[phase] = before
        return out

    def probe(self, phase: str, fn) -> None:
        """Measure ``phase`` on ``fn()`` (one example, its result discarded) unless it is
        measured: twice, the first a warm-up. For a phase whose results must not depend on
        the chunks (the attack's random starts: one generator per test batch)."""
        if phase not in self.per_example and self.measurable:
            fn()
            self.measure(phase, fn)

    def map(self, phase: str, n: int, fn) -> list:
        """``fn(slice)`` over 0..n in chunks (the first two of one example each while the
        phase is unmeasured), the results in order."""
        outs, i = [], 0
        while i < n:
            size = self.chunk(phase)
            if size is None and self.measurable and i >= 1:
                outs.append(self.measure(phase, lambda i=i: fn(slice(i, i + 1))))
                i += 1
                continue
            size = 1 if size is None and self.measurable else (size or n)
            part = slice(i, min(n, i + size))
            outs.append(self.run(phase, lambda part=part: fn(part), part.stop - part.start))
            i += size
        return outs
