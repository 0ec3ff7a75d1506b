"""A dependency-free progress line with ETA, for long loops.

On a terminal it redraws one line (``\\r``); otherwise (logs, CI) it prints a
line at most every ``log_every`` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``Progress(total, desc)``; call ``update(done, **figures)``, then ``close()``."""

    def __init__(self, total: int, desc: str = "", *, stream: TextIO | None = None,
                 enabled: bool = True, log_every: float = 15.0, start: int = 0) -> None:
        self.total = max(total, 1)
        self.desc = desc
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every
        self.start_done = start
        self.t0 = time.perf_counter()
        self.last_print = -float("inf")
        self.done = start
        self.figures: dict[str, float | str] = {}

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        fresh = self.done - self.start_done
        rate = fresh / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total
        figs = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.figures.items()
        )
        eta_s = format_seconds(eta) if eta == eta else "--:--"
        return (f"{self.desc} {pct:5.1f}% {self.done}/{self.total} "
                f"[{format_seconds(elapsed)}<{eta_s}, {rate:.2f} it/s] {figs}").strip()

    def due(self) -> bool:
        """Whether the next :meth:`update` prints (figures worth computing now)."""
        if not self.enabled:
            return False
        wait = 0.1 if self.tty else self.log_every
        return time.perf_counter() - self.last_print > wait

    def update(self, done: int, **figures: float | str) -> None:
        self.done = done
        self.figures.update(figures)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and now - self.last_print > 0.1:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
            self.last_print = now
        elif not self.tty and now - self.last_print > self.log_every:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last_print = now

    def write(self, text: str) -> None:
        """Print a message line without breaking the progress line."""
        if not self.enabled:
            return
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()
        self.last_print = -float("inf")

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
            self.stream.flush()
