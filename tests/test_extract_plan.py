"""The extract stage's mapped tasks: runs of whole shards, one writer per shard, workers equally busy."""

from __future__ import annotations

import pytest

from fss_core.embeddings.extract import shard_blocks
from tasks.extract import MAX_SHARDS_PER_TASK, task_runs


@pytest.mark.parametrize(("rows", "workers"), [(400, 2), (64 * 7 - 5, 2), (30, 2), (64 * 100, 2), (64 * 3, 4),
                                               (64 * 20, 1)])
def test_runs_cover_every_shard_once_in_balanced_tasks(rows, workers):
    shards = shard_blocks(rows, 64)
    runs = task_runs(shards, workers)
    assert [r for run in runs for r in run] == list(range(rows))  # every row once, in order
    assert all(run.start % 64 == 0 and (run.stop % 64 == 0 or run.stop == rows) for run in runs)  # whole shards
    sizes = [len(shard_blocks(run.stop - run.start, 64)) for run in runs]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= MAX_SHARDS_PER_TASK
    assert len(runs) == len(shards) or len(runs) % workers == 0


def test_done_shards_between_runs_are_spanned_not_split():
    todo = [range(0, 64), range(128, 192), range(192, 200)]  # rows 64..127 are done already
    assert task_runs(todo, 2) == [range(0, 64), range(128, 200)]
    assert task_runs([], 2) == []
