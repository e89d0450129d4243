"""Reading ``.pt``/``.pth`` files that may come from anywhere: tensors only, never pickled code.

Every checkpoint, backbone weight file and model bundle is read by :func:`load_tensors`, which
calls ``torch.load(weights_only=True)``: only tensors and plain containers (dict, list, tuple,
str, numbers) are rebuilt. A file that holds anything else — a pickled function, class or
object that would run code when unpickled — is refused with :class:`UnsafeCheckpointError`,
naming what it holds; nothing in it runs.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeCheckpointError(ValueError):
    """A weights file holds pickled Python objects besides tensors; it was not loaded."""


def load_tensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file with pickled code raises :class:`UnsafeCheckpointError`.

    Other failures (missing, truncated or foreign files) propagate as torch raises them.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found is None:
            raise  # not a checkpoint at all (junk, truncated): the caller says so
        raise UnsafeCheckpointError(
            f"{Path(path)}: refused: besides tensors it holds pickled '{found.group(1)}', which could run code "
            f"when loaded; only tensors and plain containers are read. Save the weights alone "
            f"(torch.save(model.state_dict(), path)) from a source you trust") from None
