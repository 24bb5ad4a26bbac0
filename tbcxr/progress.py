"""Progress of long loops: a live bar on a terminal, plain lines in a log file.

On a terminal (stderr is a TTY) a loop shows tqdm's bar, which vanishes when done. Sent to a
file, a bar would fill it with carriage-return fragments, so there a loop prints one plain line
every REPORT_EVERY_S seconds instead. A stage can end with one summary line on stdout that stays
in the log either way: "{desc}: N images in S s (R images/s)".
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

REPORT_EVERY_S = 30.0


def _disabled() -> bool:
    """The trainer sets TQDM_DISABLE on every torchrun rank but the first, which speaks for the job."""
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")


def rate_line(desc: str, done: int, seconds: float, noun: str = "images") -> str:
    return f"{desc}: {done} {noun} in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} {noun}/s)"


def track(
    items: Iterable,
    desc: str,
    *,
    total: int | None = None,
    size: Callable[[object], int] | None = None,
    unit: str = "img",
    noun: str = "images",
    summary: bool = True,
    every: float = REPORT_EVERY_S,
) -> Iterator:
    """Yield every item of `items`, showing progress in `unit`s (tqdm) or `noun` (plain lines).

    size(item) is how many units an item counts for (a batch: its images; default 1); `total`
    is in the same units. summary=False leaves out the final line, where the caller prints its own."""
    count = size or (lambda _: 1)
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    started = reported = time.perf_counter()
    done = 0
    if sys.stderr.isatty() and not _disabled():
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) as bar:
            for item in items:
                yield item
                step = count(item)
                done += step
                bar.update(step)
    else:
        for item in items:
            yield item
            done += count(item)
            now = time.perf_counter()
            if now - reported >= every and not _disabled():
                reported = now
                share = f" of {total} {noun} ({done / total:.0%})" if total else f" {noun}"
                sys.stdout.flush()  # keeps the log in order where stdout is a buffered file
                print(
                    f"{desc}: {done}{share}, {now - started:.0f} s, {done / (now - started):.1f} {noun}/s",
                    file=sys.stderr,
                    flush=True,
                )
    if summary:
        print(rate_line(desc, done, time.perf_counter() - started, noun), flush=True)
