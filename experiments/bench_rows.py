"""The rows of ``make bench`` (:mod:`experiments.bench`): the setting they share, the plain
PyTorch step, the two bare auto_LiRPA floors and :func:`fastcert.train.fit`'s step per method,
and one timed step of a row."""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcert.bounds import BoundedNet, auto_lirpa, margin_spec, robust_ce_from_margins
from fastcert.config import build_option
from fastcert.data import CIFAR10_MEAN, CIFAR10_STD, DataBundle
from fastcert.loggers import NullLogger
from fastcert.train import TrainSetup, fit

CIFAR_TRAIN = 50_000
#: Batches of a CIFAR-10 epoch at batch 128: the diagnostic cadence of fit's rows.
CIFAR_STEPS = math.ceil(CIFAR_TRAIN / 128)


@dataclass
class Setting:
    """What every row shares: the model, the data's shapes, the batch, ε_target (the rows
    train at ε = ε_target / 2) and the device."""

    model: str
    model_options: dict
    input_shape: tuple
    num_classes: int
    batch: int
    eps_target: float
    device: torch.device

    @property
    def eps(self) -> float:
        return self.eps_target / 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cifar_box() -> DataBundle:
    """CIFAR-10's normalisation and ε-box (no loaders)."""
    return DataBundle(None, None, (3, 32, 32), 10, torch.tensor(CIFAR10_MEAN),
                      torch.tensor(CIFAR10_STD), "cifar10")


def random_batch(s: Setting, seed: int = 0):
    """A batch of random images (normalised as CIFAR-10's) and labels on the setting's device,
    with the box of CIFAR-10's data range."""
    g = torch.Generator().manual_seed(seed)
    box = cifar_box()
    x = box.from_pixels(torch.rand(s.batch, *s.input_shape, generator=g))
    y = torch.randint(0, s.num_classes, (s.batch,), generator=g)
    return x.to(s.device), y.to(s.device), box


def fresh_model(s: Setting, seed: int = 0):
    """The setting's model, initialised from ``seed``, on its device in training mode."""
    torch.manual_seed(seed)
    model = build_option("model", s.model, s.model_options, input_shape=s.input_shape,
                         num_classes=s.num_classes)
    return model.to(s.device).train()


# --------------------------------------------------------------------------- rows


class TorchNatural:
    """Plain PyTorch natural training."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y, self.device = model, x, y, x.device
        self.opt = torch.optim.Adam(model.parameters(), lr=5e-4)

    def step(self):
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class FloorIBP:
    """The bare auto_LiRPA IBP step: CE(f(x), y) + CE(-m̲, y) with m̲ the IBP lower bounds of
    the margins (Eq. 9 of Shi et al. 2021) through a BoundedModule built here."""

    def __init__(self, model, x, y, box, eps, num_classes):
        lirpa = auto_lirpa()
        model.eval()
        self.bounded = lirpa.BoundedModule(model, x[:2], bound_opts={"relu": "adaptive"},
                                     device=x.device)
        self.bounded.train()
        model.train()
        lower, upper = box.eps_box(x, eps)
        self.x_in = lirpa.BoundedTensor(x, lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps,
                                                                    x_L=lower, x_U=upper))
        self.y, self.C, self.device = y, margin_spec(y, num_classes), x.device
        self.opt = torch.optim.Adam(model.parameters(), lr=5e-4)

    def step(self):
        logits = self.bounded(self.x_in)
        lb, _ = self.bounded.compute_bounds(x=None, method="IBP", C=self.C, bound_upper=False)
        loss = F.cross_entropy(logits, self.y) + robust_ce_from_margins(lb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class FloorLossFusion:
    """The bare auto_LiRPA loss-fusion step (Xu et al. 2020): the BoundedModule of
    CrossEntropyWrapper(model), natural CE and the upper bound of the CE, β·CROWN-IBP +
    (1-β)·IBP with β = 1 - ε/ε_target (fastcert's CROWN-IBP defaults)."""

    def __init__(self, model, x, y, box, eps, beta):
        lirpa = auto_lirpa()
        model.eval()
        wrapper = lirpa.CrossEntropyWrapper(model).eval()
        self.fused = lirpa.BoundedModule(wrapper, (x[:2], y[:2]),
                                   bound_opts={"relu": "adaptive", "loss_fusion": True},
                                   device=x.device)
        self.fused.train()
        model.train()
        self.exp = next(n for n in self.fused.modules() if isinstance(n, lirpa.BoundExp))
        lower, upper = box.eps_box(x, eps)
        self.x_in = lirpa.BoundedTensor(x, lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps,
                                                                    x_L=lower, x_U=upper))
        self.y, self.beta, self.device = y, beta, x.device
        self.opt = torch.optim.Adam(model.parameters(), lr=5e-4)

    def step(self):
        s = self.fused(self.x_in, self.y)
        natural = (torch.log(s) + self.exp.max_input).mean()
        _, ub = self.fused.compute_bounds(x=None, method="IBP", bound_lower=False)
        robust = torch.log(ub) + self.exp.max_input
        if self.beta > 0:
            _, cub = self.fused.compute_bounds(x=None, method="CROWN-IBP", bound_lower=False)
            tight = torch.log(cub) + self.exp.max_input
            robust = self.beta * tight + (1 - self.beta) * robust
        loss = natural + robust.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class _FixedEps:
    """A schedule holding ε constant (fit asks it for ε, ε_target and the phase)."""

    def __init__(self, eps, eps_target):
        self.eps_value, self.eps_target = eps, eps_target

    def eps(self, step):
        return self.eps_value

    def phase(self, epoch):
        return ("eps0" if self.eps_value == 0 else
                "final" if self.eps_value >= self.eps_target else "ramp")


class _TimedBatches:
    """A training loader for fit: ``steps`` batches from ``source`` (a callable giving an
    iterator), claiming ``length`` batches per epoch (the diagnostic cadence of a real
    epoch); records when each batch is asked for, after the device finished the last step."""

    def __init__(self, source, steps: int, length: int, device):
        self.source, self.steps, self.length, self.device = source, steps, length, device
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []
        self.generator = None

    def __len__(self):
        return self.length

    def __iter__(self):
        self.marks, self.cpu_marks = [], []
        it = self.source()
        for _ in range(self.steps):
            batch = next(it)
            self._mark()
            yield batch
        self._mark()

    def _mark(self):
        _sync(self.device)
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())

    def step_times(self, cpu: bool = False) -> list[float]:
        """Seconds (wall, or CPU) of each step after the first (untimed: a diagnostic step
        with a fresh optimiser)."""
        marks = self.cpu_marks if cpu else self.marks
        return [b - a for a, b in zip(marks[1:], marks[2:])]


class FitRow:
    """``fastcert.train.fit`` with method ``name``: one call per repetition, the first step
    untimed, then ``timed`` steps."""

    def __init__(self, name, net, x, y, box, eps, eps_target, run_dir, timed=1,
                 length=CIFAR_STEPS, source=None):
        self.method = build_option("method", name)
        self.net, self.box, self.eps, self.eps_target = net, box, eps, eps_target
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        device = x.device
        source = source or (lambda: iter(lambda: (x, y), None))
        self.loader = _TimedBatches(source, 1 + timed, length, device)
        self.optim = build_option("optim", "adam")
        self.device = device

    def run(self) -> list[float]:
        setup = TrainSetup(net=self.net, method=self.method, train_loader=self.loader,
                           box_fn=self.box.eps_box,
                           schedule=_FixedEps(self.eps, self.eps_target), optim=self.optim,
                           epochs=1, seed=0, device=self.device, run_dir=self.run_dir,
                           logger=NullLogger())
        with quiet():  # fit's epoch line and progress bar
            fit(setup)
        return self.loader.step_times()

    def cpu_times(self) -> list[float]:
        return self.loader.step_times(cpu=True)


@contextlib.contextmanager
def quiet():
    """stdout and stderr to /dev/null inside the block."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
            contextlib.redirect_stderr(null):
        yield


# --------------------------------------------------------------------------- building rows


def row_names(methods) -> list[str]:
    return ["torch natural", "floor ibp", "floor loss fusion", *(f"fit {m}" for m in methods)]


def build_row(name: str, s: Setting, run_dir: Path, shared: dict):
    """The row ``name`` on its own model (rows never share optimiser or BN state)."""
    x, y, box = shared.setdefault("batch", random_batch(s))
    model = fresh_model(s)
    if name == "torch natural":
        return TorchNatural(model, x, y)
    if name == "floor ibp":
        return FloorIBP(model, x, y, box, s.eps, s.num_classes)
    if name == "floor loss fusion":
        return FloorLossFusion(model, x, y, box, s.eps, 1 - s.eps / s.eps_target)
    method = name.split(" ", 1)[1]
    net = BoundedNet(model, x[:2], s.num_classes).train()
    return FitRow(method, net, x, y, box, s.eps, s.eps_target, run_dir / method)


def time_row(row) -> tuple[float, float | None]:
    """Wall and CPU seconds of one step of ``row``."""
    if isinstance(row, FitRow):
        return row.run()[0], row.cpu_times()[0]
    _sync(row.device)
    t0, c0 = time.perf_counter(), time.process_time()
    row.step()
    _sync(row.device)
    return time.perf_counter() - t0, time.process_time() - c0
