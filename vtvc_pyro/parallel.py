"""Independent CPU jobs side by side in forked worker processes: the held-out selection's candidate fits.

Each job must seed itself (``fit_svi`` does), so running them in workers gives the results running them one
after the other gives. Forked workers share the parent's loaded models and data without copying or
pickling them; CUDA cannot be forked into, so callers run jobs in order there.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

Item = TypeVar("Item")

_JOB: Callable[[Any], Any] | None = None  # what the forked workers run: set before they are forked


def _run(item: Any) -> Any:
    assert _JOB is not None, "fork_map: a worker started without its job"
    return _JOB(item)


def fork_map(job: Callable[[Item], Any], items: Iterable[Item], workers: int = 1) -> list[Any]:
    """``[job(item) for item in items]``, in order, computed by up to ``workers`` forked processes (in this
    process when ``workers`` is 1 or there is one item). ``job``'s return values must pickle; an exception
    in a worker is raised here."""
    items = list(items)
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers!r}")
    if workers == 1 or len(items) <= 1:
        return [job(item) for item in items]
    global _JOB
    _JOB = job
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(items))) as pool:
            return pool.map(_run, items, chunksize=1)
    finally:
        _JOB = None
