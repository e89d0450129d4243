"""The extract stage's mapped tasks: contiguous runs of the rows left to do, equally sized so that
the workers finish together, on shard boundaries where that costs little balance; a shard that two
runs share is written under one lock, one writer at a time."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.extract import MAX_SHARDS_PER_TASK, SNAP_TOLERANCE, shard_lock, task_runs


def _todo_counts(runs: list[range], todo: list[int]) -> list[int]:
    wanted = set(todo)
    return [sum(r in wanted for r in run) for run in runs]


@pytest.mark.parametrize(("rows", "workers"), [(400, 2), (64 * 7 - 5, 2), (30, 2), (64 * 100, 2), (64 * 3, 4),
                                               (64 * 20, 1), (900, 2)])
def test_runs_cover_every_row_once_in_balanced_tasks(rows, workers):
    todo = list(range(rows))
    runs = task_runs(todo, 64, workers)
    assert [r for run in runs for r in run] == todo  # every row once, in order
    counts = _todo_counts(runs, todo)
    assert max(counts) - min(counts) <= 2 * SNAP_TOLERANCE * rows / len(runs) + 1
    assert max(counts) <= MAX_SHARDS_PER_TASK * 64 * (1 + SNAP_TOLERANCE)
    assert len(runs) % workers == 0


def test_a_first_run_splits_on_shard_boundaries():
    runs = task_runs(list(range(900)), 64, 2)
    assert runs == [range(0, 448), range(448, 900)]  # 448 of 450: within the tolerance, no shared shard


def test_new_images_are_shared_equally_although_they_fill_shards_unevenly():
    # 900 rows done (the last shard, rows 896..959, holds 4), 90 new: whole shards would give the
    # workers 60 and 30 new rows, and the stage would last as long as the 60
    todo = list(range(900, 990))
    runs = task_runs(todo, 64, 2)
    assert runs == [range(900, 945), range(945, 990)]


def test_done_rows_between_todo_rows_are_spanned_not_split():
    todo = [*range(0, 64), *range(128, 200)]  # rows 64..127 are done already
    assert task_runs(todo, 64, 2) == [range(0, 64), range(128, 200)]
    assert task_runs([], 64, 2) == []


def test_few_rows_make_one_task_per_batch_at_most():
    assert task_runs(list(range(900, 910)), 64, 2, min_rows=16) == [range(900, 910)]
    assert len(task_runs(list(range(900, 940)), 64, 2, min_rows=16)) == 2


def test_a_shards_lock_is_one_per_store_and_shard_and_excludes_other_writers(tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert shard_lock(a, 3) is shard_lock(a, 3)
    assert shard_lock(a, 3) is not shard_lock(a, 4) and shard_lock(a, 3) is not shard_lock(b, 3)
    inside: list[int] = []
    overlaps = []

    def hold():
        with shard_lock(a, 3):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.02)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1, 1]

