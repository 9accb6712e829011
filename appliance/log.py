"""All user-facing output goes through here.

``log`` prints messages on stderr through rich; ``log.step(title)`` is a context manager
that announces a stage, indents what happens inside it, times it and records the timing
(``log.timings``) for the build report. ``--debug`` turns on command echo and tracebacks:
it is a context value (``with debugging(True): ...``, set by the task wrapper for one task),
not a switch on the logger, so a test or a library caller that never asks for it never gets it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

# Whether the current task runs with --debug; a new thread starts without it (Python 3.11).
_DEBUG: ContextVar[bool] = ContextVar("appliance_debug", default=False)


@contextmanager
def debugging(enabled: bool) -> Iterator[None]:
    """Show debug output (commands run, connection attempts) inside this block only."""
    token = _DEBUG.set(enabled)
    try:
        yield
    finally:
        _DEBUG.reset(token)


# How a pipeline stage that did not fail ended (failures are exceptions).
StageStatus = Literal["ok", "skipped"]
# How a timed step ended, as build-report.json records it; "running" until it ends.
TimingOutcome = Literal["running", "ok", "skipped", "failed", "cancelled"]


@dataclass
class StepTiming:
    """One timed step, as it goes into ``build-report.json``."""

    name: str
    started: str
    ended: str = ""
    seconds: float = 0.0
    outcome: TimingOutcome = "running"
    clock: float = field(default_factory=time.monotonic, repr=False)  # when it started (monotonic)


@dataclass
class Logger:
    console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False, soft_wrap=True))
    depth: int = 0
    timings: list[StepTiming] = field(default_factory=list)

    def _emit(self, text: str, style: str | None = None) -> None:
        pad = "  " * self.depth
        self.console.print(pad + text, style=style, markup=False)

    def info(self, msg: str, *args: object) -> None:
        self._emit(msg % args if args else msg)

    def success(self, msg: str, *args: object) -> None:
        self._emit(msg % args if args else msg, style="green")

    def warning(self, msg: str, *args: object) -> None:
        self._emit("warning: " + (msg % args if args else msg), style="yellow")

    def error(self, msg: str, *args: object) -> None:
        self._emit("error: " + (msg % args if args else msg), style="bold red")

    def debug(self, msg: str, *args: object) -> None:
        if _DEBUG.get():
            self._emit(msg % args if args else msg, style="dim")

    def output(self, line: str, *, stderr: bool = False) -> None:
        """A line of a command's streamed output, indented under the current step."""
        self._emit(("│ " if not stderr else "┆ ") + line, style="dim" if not stderr else None)

    @contextmanager
    def transfer(
        self, description: str, total: int | None, *, completed: int = 0, show: bool = True
    ) -> Iterator[Callable[[int], None]]:
        """A byte-count progress bar (downloads, uploads) on an interactive terminal; yields ``advance(n)``."""
        bar = Progress(
            TextColumn("  " * self.depth + "{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not (show and is_interactive()),
        )
        with bar:
            task = bar.add_task(description, total=total, completed=completed)
            yield lambda n: bar.advance(task, n)

    @contextmanager
    def step(self, title: str, *, record: bool = True) -> Iterator[StepTiming]:
        """Announce, indent, time and record one step; the outcome is ``ok``, ``failed`` or ``cancelled``."""
        timing = StepTiming(name=title, started=_now())
        if record:
            self.timings.append(timing)
        self.console.print("  " * self.depth + f"[bold cyan]▶ {escape(title)}[/]")
        self.depth += 1
        start = timing.clock
        try:
            yield timing
        except KeyboardInterrupt:
            timing.outcome = "cancelled"
            raise
        except BaseException:
            timing.outcome = "failed"
            raise
        else:
            if timing.outcome == "running":
                timing.outcome = "ok"
        finally:
            self.depth -= 1
            timing.seconds = round(time.monotonic() - start, 3)
            timing.ended = _now()
            mark = {"ok": "[green]✔[/]", "skipped": "[dim]–[/]"}.get(timing.outcome, "[red]✘[/]")
            self.console.print(
                "  " * self.depth + f"{mark} {escape(title)} [dim]({timing.outcome}, {timing.seconds:.1f} s)[/]"
            )


def human_size(size: float) -> str:
    """A byte count for people: ``512 B``, ``2.1 MiB``, ``3.4 GiB`` (binary units, GiB at most)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def timestamp() -> str:
    """Now, as the build report writes times (UTC, ISO 8601, to the second)."""
    return _now()


log = Logger()


def is_interactive() -> bool:
    return sys.stderr.isatty()
