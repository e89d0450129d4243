"""Imported first by the process local Dask workers are forked from (``flows.dask_runtime``), and
by no other process.

A forked worker would start with its forkserver's global random states, the same in every
worker; a spawned one draws its own. This registers a hook that gives each forked worker fresh
ones, so forking changes nothing but the start-up time. Nothing here imports Prefect.

The forkserver does nothing but import the stack and fork, so its cyclic garbage collector is
switched off here, before the imports that follow: its collections would only walk the
imported objects over and over (``fss_cli.process`` explains the cost). Before each fork those
objects are frozen out of the collector's reach for good, and the worker starts with the
collector on, as a spawned one does, for the objects it creates itself.

The workers ignore SIGINT. Ctrl-C at a terminal reaches every process of its foreground group;
a worker that died of it would print its traceback and lose its task's cleanup, while the
process that started the cluster stops its workers anyway as it handles the interruption. The
forkserver itself ignores SIGINT and hands its forks the handlers it found after these imports,
so setting it here reaches every worker.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

gc.disable()
signal.signal(signal.SIGINT, signal.SIG_IGN)


def _fresh_random_states() -> None:
    seed = int.from_bytes(os.urandom(8), "little")
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def _worker_start() -> None:
    _fresh_random_states()
    gc.enable()


os.register_at_fork(before=gc.freeze, after_in_child=_worker_start)
