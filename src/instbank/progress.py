"""Terminal output: progress (a rich bar on a terminal, plain lines otherwise: CI logs, pipes) and
consoles that never wrap a line that is not going to a terminal."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from instbank.types import ProgressFn

#: Plain-mode line interval in seconds: often enough to see a build move, rare enough for logs.
PLAIN_EVERY_S = 5.0


def console(stderr: bool = False):
    """A rich ``Console`` for stdout (or stderr). On a terminal it fits the window; elsewhere (a
    log, a pipe, a file) it neither wraps nor cuts: one line of output stays one line, whole."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=100_000)


@contextmanager
def build_progress(total_images: int, stream=None) -> Iterator[ProgressFn]:
    """Yield ``update(images, crops)`` (increments) that drives a progress display on stderr."""
    stream = stream or sys.stderr
    if stream.isatty():
        with _rich_progress(total_images, stream) as update:
            yield update
    else:
        with _plain_progress(total_images, stream) as update:
            yield update


@contextmanager
def _rich_progress(total: int, stream):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    state = {"crops": 0, "t0": time.perf_counter()}
    progress = Progress(
        TextColumn("[bold]building"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
        TextColumn("{task.fields[crops]} crops"), TextColumn("{task.fields[rate]} crops/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(file=stream), transient=False,
    )
    task = progress.add_task("build", total=total, crops=0, rate="-")

    def update(images: int, crops: int) -> None:
        state["crops"] += crops
        rate = state["crops"] / max(time.perf_counter() - state["t0"], 1e-9)
        progress.update(task, advance=images, crops=state["crops"], rate=f"{rate:.0f}")

    with progress:
        yield update


@contextmanager
def _plain_progress(total: int, stream):
    state = {"images": 0, "crops": 0, "t0": time.perf_counter(), "last": 0.0}

    def line() -> None:
        dt = time.perf_counter() - state["t0"]
        stream.write(f"building: {state['images']}/{total} images, {state['crops']} crops, "
                     f"{state['crops'] / max(dt, 1e-9):.0f} crops/s, {dt:.1f}s\n")
        stream.flush()

    def update(images: int, crops: int) -> None:
        state["images"] += images
        state["crops"] += crops
        now = time.perf_counter()
        if now - state["last"] >= PLAIN_EVERY_S:
            state["last"] = now
            line()

    yield update
    line()


@contextmanager
def count_progress(total: int, what: str, stream=None) -> Iterator[ProgressFn]:
    """Yield ``update(images, crops)`` for a job over ``total`` crops (convert, verify, merge)."""
    stream = stream or sys.stderr
    if stream.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TextColumn("crops"),
                            TimeRemainingColumn(), console=Console(file=stream))
        task = progress.add_task(what, total=total)
        with progress:
            yield lambda images, crops: progress.advance(task, crops)
        return
    state = {"done": 0, "last": time.perf_counter()}

    def update(images: int, crops: int) -> None:
        state["done"] += crops
        if time.perf_counter() - state["last"] >= PLAIN_EVERY_S:
            state["last"] = time.perf_counter()
            stream.write(f"{what}: {state['done']}/{total} crops\n")
            stream.flush()

    yield update
