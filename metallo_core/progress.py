"""Progress lines on stderr for long commands, at most one every few seconds (stdout stays for results)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int | None = None, every_s: float = 5.0, stream=None):
        self.label = label
        self.total = total
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = time.perf_counter()
        self._last_print = self.started

    def advance(self, count: int = 1, note: str = "") -> None:
        self.done += count
        now = time.perf_counter()
        if now - self._last_print >= self.every_s:
            self._last_print = now
            self._print(note)

    def finish(self, note: str = "") -> float:
        self._print(note)
        return self.rate

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        return self.done / max(self.elapsed, 1e-9)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None without a total or before anything is done."""
        if not self.total or not self.done:
            return None
        return max(self.total - self.done, 0) / max(self.rate, 1e-9)

    def _print(self, note: str) -> None:
        total = f"/{self.total}" if self.total else ""
        eta = f", ETA {self.eta_s:.0f}s" if self.eta_s and self.done < (self.total or 0) else ""
        extra = f" {note}" if note else ""
        print(
            f"[{self.label}] {self.done}{total} in {self.elapsed:.1f}s ({self.rate:.1f}/s{eta}){extra}",
            file=self.stream,
            flush=True,
        )
