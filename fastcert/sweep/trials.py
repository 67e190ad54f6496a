"""The study's bookkeeping: who runs which trial, the budget, trials left behind by a launcher
that died, and what a finished job tells the study.

Every trial a launcher asks for carries user attributes naming it: ``fastcert:host``,
``fastcert:pid`` and ``fastcert:heartbeat`` (refreshed every ``heartbeat_s`` seconds by a thread
of the launcher while the trial runs), and ``run_dir``. A RUNNING trial is *stale* when its
launcher is gone: on this host, its process no longer exists; elsewhere, its heartbeat is older
than ``stale_after_s``. A stale trial is told FAIL with the user attribute ``discarded`` and its
parameters are enqueued again (``requeued_from``, and ``resume_from`` = its last.pt where it
wrote one), so the next ask runs the same configuration, continuing its training from that
checkpoint (``resume.checkpoint``), as a new trial with a new number.

The budget ``n_trials`` is the study's total (as CTRAIN's ``hpo()``): every trial counts —
COMPLETE, PRUNED, FAIL, RUNNING and WAITING — except the discarded ones (a stale trial, whose
requeued copy counts instead; a trial asked beyond the budget when several launchers asked at
the same moment). A relaunch tops the study up to ``n_trials``; launchers sharing a study stop
together when it is full (the trials with the lowest numbers are the budget's).
"""
from __future__ import annotations

import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

HOST, PID, HEARTBEAT = "fastcert:host", "fastcert:pid", "fastcert:heartbeat"
DISCARDED, REQUEUED_FROM, RESUME_FROM = "discarded", "requeued_from", "resume_from"
RUN_DIR, METRICS, ERROR, CONSTRAINTS = "run_dir", "metrics", "error", "constraints"
#: results.json keys copied into a trial's ``metrics`` attribute besides the accuracies.
RESULT_KEYS = ("n_val", "n_test", "wall_time_s", "method", "model", "data", "eps", "epochs",
               "stopped_early")


def counted(trials) -> list:
    """The trials the budget counts (module docstring)."""
    return [t for t in trials if DISCARDED not in t.user_attrs]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(trial, stale_after_s: float, now: float | None = None) -> str | None:
    """Why a RUNNING trial is stale (module docstring), or None while its launcher lives."""
    attrs = trial.user_attrs
    host, pid = attrs.get(HOST), attrs.get(PID)
    if host == socket.gethostname() and pid is not None and not process_alive(int(pid)):
        return f"its launcher (process {pid} on {host}) is gone"
    now = time.time() if now is None else now
    beat = attrs.get(HEARTBEAT)
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if beat is not None and now - float(beat) > stale_after_s:
        return f"its launcher ({pid} on {host}) sent no heartbeat for {now - float(beat):.0f} s"
    return None


def requeue_stale(study, stale_after_s: float) -> list[tuple[int, str]]:
    """Tell every stale RUNNING trial FAIL (``discarded``) and enqueue its parameters again;
    returns (trial number, reason) of each."""
    from optuna.trial import Trial, TrialState

    done = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(t, stale_after_s)
        if reason is None:
            continue
        try:
            Trial(study, t._trial_id).set_user_attr(DISCARDED, f"stale: {reason}")
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another launcher finished or requeued it first
            continue
        attrs: dict[str, Any] = {REQUEUED_FROM: t.number}
        checkpoint = Path(str(t.user_attrs.get(RUN_DIR, ""))) / "last.pt"
        if t.user_attrs.get(RUN_DIR) and checkpoint.is_file():
            attrs[RESUME_FROM] = str(checkpoint)
        study.enqueue_trial(t.params, user_attrs=attrs, skip_if_exists=False)
        done.append((t.number, reason))
    return done


def over_budget(study, trial, n_trials: int) -> bool:
    """Whether ``trial`` lies beyond the budget: more than ``n_trials`` counted trials up to
    its number (several launchers asked at the same moment)."""
    mine = [t for t in counted(study.get_trials(deepcopy=False)) if t.number <= trial.number]
    return len(mine) > n_trials


def mark_mine(trial, run_dir: Path) -> None:
    """The attributes that say which launcher runs ``trial`` and where."""
    trial.set_user_attr(HOST, socket.gethostname())
    trial.set_user_attr(PID, os.getpid())
    trial.set_user_attr(HEARTBEAT, time.time())
    trial.set_user_attr(RUN_DIR, str(run_dir))


class Heartbeat:
    """A thread refreshing the ``fastcert:heartbeat`` of the trials this launcher runs."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.trials: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fastcert-heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, trials: list) -> None:
        with self._lock:
            self.trials = list(trials)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                for t in self.trials:
                    try:
                        t.set_user_attr(HEARTBEAT, time.time())
                    except Exception:  # noqa: BLE001 - a finished trial: nothing to refresh
                        pass


def metrics_of(results: dict) -> dict:
    """What a trial keeps of its results.json: every accuracy and :data:`RESULT_KEYS`."""
    return {k: v for k, v in results.items() if k.endswith("_acc") or k in RESULT_KEYS}


def constraint_values(constraints: dict, metrics: dict) -> list[float]:
    """CTRAIN's constraints (≤ 0 feasible): ``minimum − value`` per key of ``constraints``
    (a missing value is infeasible by 1)."""
    return [float(low) - float(metrics[k]) if metrics.get(k) is not None else 1.0
            for k, low in constraints.items()]


def objective_values(value: Any, n: int) -> list[float]:
    """The task's return value as ``n`` finite floats (one number for one objective)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != n:
        raise ValueError(f"the task returned {value!r}: {n} objective value(s) expected "
                         f"(optimized_metric lists one results.json key per direction)")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = [math.nan]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"the task returned {value!r}: not finite numbers")
    return out
