"""``fork_map``: the same list, in order, as a loop in this process; a worker's exception reaches the
caller."""

from __future__ import annotations

import os

import pytest

from vtvc_pyro.parallel import fork_map


def test_forked_workers_return_what_a_loop_returns_in_order():
    parent = os.getpid()
    offset = 7  # a closure's state reaches the workers without pickling

    def job(item: int) -> tuple[int, int, bool]:
        return item, item * item + offset, os.getpid() != parent

    looped = [job(i) for i in range(6)]
    forked = fork_map(job, range(6), workers=3)
    assert [r[:2] for r in forked] == [r[:2] for r in looped]
    assert all(in_worker for _, _, in_worker in forked)
    assert all(not in_worker for _, _, in_worker in fork_map(job, range(3), workers=1))


def test_a_failing_job_raises_in_the_caller():
    def job(item: int) -> int:
        if item == 2:
            raise ValueError(f"item {item} is bad")
        return item

    with pytest.raises(ValueError, match="item 2 is bad"):
        fork_map(job, range(4), workers=2)
    with pytest.raises(ValueError, match="workers: must be >= 1"):
        fork_map(job, range(4), workers=0)
