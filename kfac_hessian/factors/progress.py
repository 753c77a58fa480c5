"""Progress with an ETA for the phases that can take long (the batches of a pass, the backward chunks of a batch, the
eigendecompositions of many blocks).

``tracked`` wraps an iterable: with ``tqdm`` installed, its bar (which shows the rate and the time left); without
it, a plain line on stderr at most every ``interval`` seconds and at the end — ``done/total unit``, seconds per unit
and the time left (``ETA``) when the total is known. An item may stand for several units (``size``: a chunk of
blocks decomposed together counts its blocks).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

Item = TypeVar("Item")


def tracked(items: Iterable[Item], description: str, total: int | None, unit: str, *, leave: bool = True,
            interval: float = 2.0, stream: TextIO | None = None,
            size: Callable[[Item], int] | None = None) -> Iterator[Item]:
    """``items`` with progress reported as they are consumed (module docstring); ``total`` counts units, each item
    ``size(item)`` of them (default one)."""
    try:
        from tqdm.auto import tqdm  # an optional dependency (the demo extra)
    except ImportError:
        return _lines(items, description, total, unit, interval, stream or sys.stderr, size)
    if size is None:
        return iter(tqdm(items, desc=description, unit=unit, total=total, leave=leave))
    return _sized_bar(tqdm(desc=description, unit=unit, total=total, leave=leave), items, size)


def _sized_bar(bar, items: Iterable[Item], size: Callable[[Item], int]) -> Iterator[Item]:
    with bar:
        for item in items:
            yield item
            bar.update(size(item))


def _lines(items: Iterable[Item], description: str, total: int | None, unit: str, interval: float,
           stream: TextIO, size: Callable[[Item], int] | None) -> Iterator[Item]:
    start = last = time.perf_counter()
    done = printed = 0
    for item in items:
        yield item
        done += 1 if size is None else size(item)
        now = time.perf_counter()
        if now - last >= interval or done == total:
            _write(stream, progress_line(description, done, total, unit, now - start))
            last, printed = now, done
    if done != printed:  # the end of an iterable of unknown length
        _write(stream, progress_line(description, done, total, unit, time.perf_counter() - start))


def _write(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()


def progress_line(description: str, done: int, total: int | None, unit: str, seconds: float) -> str:
    """``"description: done/total unit, s/unit, ETA …"`` (no ETA without a total)."""
    per = seconds / max(done, 1)
    line = f"{description}: {done}{f'/{total}' if total else ''} {unit}, {per:.3g} s/{unit}, {seconds:.1f} s"
    if total:
        line += f", ETA {per * (total - done):.1f} s"
    return line
