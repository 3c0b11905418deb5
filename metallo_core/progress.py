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
        self._printed_done: int | None = None  # the count the last line showed

    def advance(self, count: int = 1, note: str = "") -> None:
        self.done += count
        now = time.perf_counter()
        if now - self._last_print >= self.every_s:
            self._last_print = now
            self._print(note)

    def finish(self, note: str = "") -> float:
        """The closing line (unless the last line already showed every item); returns items/s."""
        if self._printed_done != self.done or note:
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
        extra = f" {note}" if note else ""
        seconds_left = self.eta_s
        eta = f", ETA {format_duration(seconds_left)}" if seconds_left and self.done < (self.total or 0) else ""
        self._printed_done = self.done
        print(
            f"[{self.label}] {self.done}{total} in {self.elapsed:.1f}s ({self.rate:.1f}/s{eta}){extra}",
            file=self.stream,
            flush=True,
        )


class EpochProgress:
    """One line per finished epoch: `[label] epoch 3/10: loss 4.1023 (12.5 s/epoch, ETA 1.5 min)`.

    `first_epoch` is where this session started (a resumed run counts only its own epochs for the ETA).
    """

    def __init__(self, label: str, epochs: int, first_epoch: int = 0, stream=None):
        self.label = label
        self.epochs = epochs
        self.first_epoch = first_epoch
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()

    def epoch_done(self, epoch: int, metrics: dict[str, float]) -> None:
        """`epoch` is 0-based; `metrics` are printed in the given order, 4 decimals."""
        seconds_per_epoch = (time.perf_counter() - self.started) / max(epoch + 1 - self.first_epoch, 1)
        left = self.epochs - epoch - 1
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        eta = f", ETA {format_duration(left * seconds_per_epoch)}" if left else ""
        # write(), not print(): Ray Train's workers patch print() to log as well, which would show it twice.
        self.stream.write(f"[{self.label}] epoch {epoch + 1}/{self.epochs}: {shown} "
                          f"({seconds_per_epoch:.1f} s/epoch{eta})\n")
        self.stream.flush()


def format_duration(seconds: float) -> str:
    """`42 s`, `3.5 min` or `2.1 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
