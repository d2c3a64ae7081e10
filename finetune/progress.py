"""Progress for long stages: a rich bar on a terminal, a plain log line at intervals otherwise.

Both go to stderr; results go to stdout. Quiet mode (-q) shows neither.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("finetune")


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _format_bytes(count: float) -> str:
    """Decimal units, as rich's download columns show them: 950 B, 12.3 kB, 101.1 MB."""
    units = ("B", "kB", "MB", "GB")
    power = 0
    while count >= 1000 and power < len(units) - 1:
        count /= 1000
        power += 1
    return f"{count:.0f} B" if power == 0 else f"{count:.1f} {units[power]}"


def _format_fields(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


class Progress:
    """Counts work done toward a total and shows rate and ETA.

    Use as a context manager; call ``advance(n, **fields)`` as work completes. ``fields`` (loss, accuracy,
    ...) are shown beside the count. ``unit`` names what is counted ("images", "steps", "bytes"); bytes are
    shown in kB/MB with a transfer speed.
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        unit: str = "images",
        *,
        interval: float = 10.0,
        start: int = 0,
        rate_unit: str | None = None,
        rate_scale: float = 1.0,
    ):
        self.description = description
        self.total = total
        self.unit = unit
        self.interval = interval
        self.completed = start
        self._start_count = start
        self.rate_unit = rate_unit or f"{unit}/s"
        self.rate_scale = rate_scale  # e.g. images per step, to show images/s while counting steps
        self.fields: dict[str, Any] = {}
        self._bar = None
        self._task = None
        self._started = 0.0
        self._last_log = 0.0

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return (self.completed - self._start_count) * self.rate_scale / elapsed if elapsed > 0 else 0.0

    def __enter__(self) -> "Progress":
        self._started = self._last_log = time.monotonic()
        if log.isEnabledFor(logging.INFO) and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress
            from rich.progress import TimeRemainingColumn, TransferSpeedColumn

            if self.unit == "bytes":
                amount, rate = DownloadColumn(), TransferSpeedColumn()
            else:
                amount, rate = MofNCompleteColumn(), TextColumn("{task.fields[rate]}")
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                amount,
                rate,
                TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                self.description, total=self.total, completed=self.completed, rate="", extra=""
            )
        return self

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.completed += n
        self.fields.update(fields)
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=self.completed,
                rate=f"{self.rate:.1f} {self.rate_unit}",
                extra=_format_fields(self.fields),
            )
        elif now - self._last_log >= self.interval:
            self._last_log = now
            log.info(self._line())

    def _line(self) -> str:
        if self.unit == "bytes":
            done = _format_bytes(self.completed) + (f" of {_format_bytes(self.total)}" if self.total else "")
            parts = [f"{self.description}: {done}", f"{_format_bytes(self.rate)}/s"]
        else:
            done = f"{self.completed}/{self.total}" if self.total else f"{self.completed}"
            parts = [f"{self.description}: {done} {self.unit}", f"{self.rate:.1f} {self.rate_unit}"]
        if self.total and self.rate > 0 and self.completed < self.total:
            remaining = (self.total - self.completed) * self.rate_scale / self.rate
            parts.append(f"ETA {_format_duration(remaining)}")
        if self.fields:
            parts.append(_format_fields(self.fields))
        return ", ".join(parts)

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc_info[0] is None and self.completed > self._start_count:
            log.info(self._line())
