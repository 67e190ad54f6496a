"""What the command-line front ends (``fastcert.run``, ``fastcert.certify``, ``fastcert.export``)
share at the edge: a console free of known-harmless warnings, one clear line (no traceback)
for mistakes the user can fix, and a clean stop on SIGTERM / SIGINT.

Known-harmless, silenced (each says nothing about this run):

* ``torch.jit.script is deprecated`` (FutureWarning): auto_LiRPA decorates helpers with it;
* ``No CUDA runtime is found`` (torch.utils.cpp_extension, logged when auto_LiRPA imports it on
  a CPU-only machine);
* ``The feature will be removed`` (DeprecationWarning of torch's own ONNX exporter internals,
  seen by ``fastcert.export``);
* alembic's INFO lines (Optuna's database migrations in ``hparams_search`` sweeps).
"""
from __future__ import annotations

import logging
import signal
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager

#: Exit status of a run stopped by a signal: 128 + the signal's number (the shell's convention).
SIGNALS = (signal.SIGTERM, signal.SIGINT)


#: Messages of the known-harmless warnings.
HARMLESS = ("`torch.jit.script` is deprecated", "The feature will be removed")


def quiet_known_warnings() -> None:
    """Silence the known-harmless warnings (call before torch / auto_LiRPA are imported).

    auto_LiRPA replaces the warning filters at import (``warnings.simplefilter("once")``), so
    the warnings are dropped where they are shown, not by a filter."""
    show = warnings.showwarning

    def showwarning(message, category, *args, **kwargs):
        if not any(h in str(message) for h in HARMLESS):
            show(message, category, *args, **kwargs)

    warnings.showwarning = showwarning
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


class UsageError(Exception):
    """A command line that cannot run (an unknown key, a missing option, a syntax error),
    found before anything is written; printed as ``error: <message>``."""


class Preempted(KeyboardInterrupt):
    """The process received SIGTERM or SIGINT. A KeyboardInterrupt, which no ``except
    Exception`` swallows and which the pipeline treats as a preemption (the logger marks the
    run preempting)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_preempted(signum, frame):
    raise Preempted(signum)


@contextmanager
def preemptible():
    """Turn SIGTERM and SIGINT into :class:`Preempted` inside the block (the previous
    handlers come back after it)."""
    previous = {s: signal.signal(s, _raise_preempted) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _known_errors() -> tuple[type[BaseException], ...]:
    from fastcert.checkpoint import CheckpointError
    from fastcert.config import ConfigError
    from fastcert.data import DatasetNotFoundError
    from fastcert.train import TrainingDiverged

    return ConfigError, CheckpointError, DatasetNotFoundError, TrainingDiverged


#: What ``fastcert.run`` says when a signal stops it.
RUN_STOPPED = ("the last checkpoint (last.pt, written after each epoch) is kept; continue with "
               "resume.checkpoint=last hydra.run.dir=<run dir>")


@contextmanager
def exit_on_known_errors(stopped: str = ""):
    """A mistake the user can fix (a command line, a config value, a checkpoint, missing data,
    a diverged training) prints one line ``error: <Type>: <message>`` (``error: <message>``
    for a :class:`UsageError`) and exits with status 2; a soundness violation (results are
    already written) exits with status 3; a signal prints ``stopped by <SIGNAL>`` (and
    ``stopped``, what is kept) and exits with 128 + its number. Anything else is a bug and
    keeps its traceback."""
    try:
        yield
    except Preempted as e:
        note = f": {stopped}" if stopped else ""
        print(f"stopped by {signal.Signals(e.signum).name}{note}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - sorted below; the rest is re-raised
        from fastcert.evaluate import SoundnessError

        if isinstance(e, SoundnessError):
            print(f"error: SoundnessError: {e}", file=sys.stderr, flush=True)
            sys.exit(3)
        if isinstance(e, _known_errors()):
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise


def checkpoint_command(main: Callable[[], None], command: str) -> None:
    """The command line of ``python -m <command> checkpoint=PATH ...`` (certify, export): the
    known-harmless warnings silenced, a one-line error (exit 2) for a missing or mistyped
    ``checkpoint=`` before Hydra starts, fastcert's resolvers registered (its
    ``hydra.run.dir`` is the checkpoint's folder), then the Hydra app ``main``. SIGINT
    (Ctrl-C) and SIGTERM stop it with one line and status 128 + the signal's number, at any
    point (the imports included)."""
    with exit_on_known_errors(), preemptible():
        quiet_known_warnings()
        from fastcert import resolvers
        from fastcert.rebuild import precheck

        problem = precheck(sys.argv[1:], command)
        if problem:
            raise UsageError(problem)
        resolvers.register()
        main()
