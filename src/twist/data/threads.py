"""A bounded, ordered thread map for decoding images (PIL releases the GIL while decoding), with
an optional progress bar. Used by the folder scan, the full decode and streamed batches."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

PROGRESS_DELAY_S = 1.0  # progress bars appear only for loads that take longer than this


def num_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], threads: int, *, progress: bool = False,
                 desc: str = "") -> Iterator[Any]:
    """``map(fn, items)`` in order, on ``threads`` threads (PIL decodes without the GIL), with a
    bounded window of pending work and an optional progress bar. ``fn`` must not raise."""
    from tqdm.auto import tqdm

    n = len(items)
    bar = tqdm(total=n, desc=desc, unit="img", disable=None if progress else True,
               delay=PROGRESS_DELAY_S, leave=False)
    try:
        if threads <= 1 or n < 8:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with ThreadPoolExecutor(max_workers=threads) as pool:
            it = iter(items)
            window = deque(pool.submit(fn, x) for _, x in zip(range(threads * 4), it))
            try:
                while window:
                    result = window.popleft().result()
                    nxt = next(it, _END)
                    if nxt is not _END:
                        window.append(pool.submit(fn, nxt))
                    yield result
                    bar.update()
            finally:
                for fut in window:
                    fut.cancel()
    finally:
        bar.close()


_END = object()
