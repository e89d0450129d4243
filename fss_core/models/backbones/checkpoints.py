"""Reading checkpoint files and mapping their keys strictly onto a backbone.

Every published format is reduced to the backbone's own state-dict keys by a documented
rule (strip a prefix, drop a projection head, require and then discard a classifier).
After that rule, the file must match the module exactly: a missing, unexpected or
mis-shaped key is an error that names the keys and the file, never a silent partial load.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from fss_core.torch_files import UnsafeCheckpointError, load_tensors

# BatchNorm's step counter is bookkeeping, not a weight: older files lack it, frozen norms have none.
_COUNTER_SUFFIX = "num_batches_tracked"
_LISTED = 20


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the backbone; the message lists them."""


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a checkpoint file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file on the CPU with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        content = load_tensors(path)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike on bad files
        raise CheckpointMismatchError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(content, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a dict of tensors, found {type(content).__name__}")
    return dict(content)


def unwrap(content: Mapping, path: str | os.PathLike, wrappers: Iterable[str]) -> dict:
    """Return ``content[w]`` for the first wrapper key ``w`` present, else ``content`` itself."""
    for key in wrappers:
        if key in content:
            inner = content[key]
            if not isinstance(inner, Mapping):
                raise CheckpointMismatchError(f"{path}: '{key}' holds {type(inner).__name__}, not a state dict")
            return dict(inner)
    return dict(content)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that starts with it; other keys are kept unchanged."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def take_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only the keys under ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    more = f", ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return f"  {title} ({len(keys)}): {shown}{more}"


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    required_unused: Iterable[str] = (),
) -> None:
    """Copy ``state`` into ``module`` after checking that keys and shapes match exactly.

    ``required_unused`` names keys the format always carries (a classifier the backbone
    does not have): they must be present, and are then discarded. Non-tensor values are
    reported as unexpected. Raises ``CheckpointMismatchError`` listing the missing,
    unexpected and mis-shaped keys (the first 20 of each, with counts) and the file path.
    """
    state = dict(state)
    absent_required = [k for k in required_unused if k not in state]
    for key in required_unused:
        state.pop(key, None)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith(_COUNTER_SUFFIX) and k not in own)}
    missing = absent_required + [k for k in own if k not in state and not k.endswith(_COUNTER_SUFFIX)]
    unexpected = [k for k, v in state.items() if k not in own or not isinstance(v, torch.Tensor)]
    mis_shaped = [
        f"{k} file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"checkpoint {path} does not match {type(module).__name__}:"]
        kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped))
        lines += [_listing(title, keys) for title, keys in kinds if keys]
        raise CheckpointMismatchError("\n".join(lines))
    full = {k: state.get(k, v) for k, v in own.items()}
    module.load_state_dict(full, strict=True)
