"""Preloaded by each worker of a local Dask cluster as it starts (``flows.dask_runtime``).

It imports the flow's task modules (Prefect among them) once, as the worker starts, instead of
in front of each stage's first task on that worker. The imports run with the cyclic garbage
collector off and what they create is then frozen out of its reach, as in the ``fss`` process
(``fss_cli.process`` explains why); the worker's own objects are collected as usual.
"""

from __future__ import annotations

import gc

gc.disable()
try:
    import flows.pipeline  # noqa: F401  (imported for the task modules it imports)
finally:
    gc.freeze()
    gc.enable()
