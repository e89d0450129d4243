"""Imported first by the process local Dask workers are forked from (``flows.dask_runtime``).

A forked worker would start with its forkserver's global random states, the same in every
worker; a spawned one draws its own. This registers a hook that gives each forked worker fresh
ones, so forking changes nothing but the start-up time. Nothing here imports Prefect.
"""

from __future__ import annotations

import os
import sys


def _fresh_random_states() -> None:
    seed = int.from_bytes(os.urandom(8), "little")
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


os.register_at_fork(after_in_child=_fresh_random_states)
