"""certify's progress bar: examples done of this process's share at one ε, with an ETA (tqdm's,
from the rate so far) and per-stage counts: decided by the attack, by each verifier, the complete
stage's verdicts, and the example the engine is on."""
from __future__ import annotations

from collections import Counter

#: The order of the counts: what decided the examples, cheapest first.
ORDER = ("clean", "attack", "ibp", "crown_ibp", "crown", "alpha_crown", "complete", "undecided")


class Progress:
    def __init__(self, eps: float, total: int, enabled: bool, position: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"certify eps={eps:.4g}", disable=not enabled,
                        dynamic_ncols=True, mininterval=1.0, position=position)
        self.decided: Counter = Counter()
        self.engine: Counter = Counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        return False

    def _show(self, extra: str = "") -> None:
        parts = [f"{k} {self.decided[k]}" for k in ORDER if self.decided[k]]
        if self.engine:
            parts.append("complete " + "/".join(f"{k[0]}{v}" for k, v in self.engine.items()))
        self.bar.set_postfix_str(", ".join(parts) + extra, refresh=False)

    def batch(self, rows: list[dict]) -> None:
        """A test batch through the attack and the cascade."""
        self.decided.update(r["decided_by"] or "undecided" for r in rows)
        self._show()
        self.bar.update(len(rows))

    def engine_started(self, index: int) -> None:
        self._show(f", engine on #{index}")
        self.bar.refresh()

    def complete(self, verdict: str) -> None:
        self.engine[verdict] += 1
        self._show()
        self.bar.refresh()
