"""Training checkpoints: atomic writes, strict loads, and the RNG states for exact resume.

Every checkpoint is a dict holding only tensors and plain Python values (the NumPy RNG state is
stored as a tensor), so all files are read with ``torch.load(weights_only=True)``: loading a
checkpoint never runs pickled code. Files written by the trainer:

- ``last.pt``: ``model`` (the whole state dict, frozen backbone included), ``sgd``, ``adamw``,
  ``scaler``, ``epoch`` (the last finished epoch, 0-based), ``global_it``, ``history``,
  ``best_epoch``, ``best_score``, ``rng`` and ``settings``.
- ``best.pt`` / ``final.pt``: ``model``, ``epoch``, ``score`` (that epoch's validation mIoU, or
  None) and ``settings``.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fss_core.torch_files import UnsafeCheckpointError, load_tensors


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` atomically (a temporary file in the same folder, then a rename).

    A crash during the write leaves the previous file intact. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict onto the CPU with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = load_tensors(path)
    except UnsafeCheckpointError:
        raise
    except Exception as error:
        raise ValueError(f"checkpoint {path} cannot be read: {error}") from error
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {path} holds a {type(payload).__name__}, expected a dict")
    return payload


def rng_state() -> dict[str, Any]:
    """The states of the torch (CPU and every CUDA device), NumPy and Python global RNGs."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNGs from :func:`rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _model_state(payload: dict[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict inside one of our checkpoints, or the payload itself if it is one."""
    state = payload.get("model", payload)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds neither a 'model' state dict nor a plain state dict")
    return state


def _few(names: list[str], shown: int = 10) -> str:
    """The first ``shown`` names, and how many there are when some are left out."""
    return f"{names[:shown]}" + (f" ({len(names)} in all)" if len(names) > shown else "")


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load the model weights of a checkpoint into ``model``, strictly (every key, every shape).

    Accepts ``last.pt``/``best.pt``/``final.pt`` written by the trainer or a plain state dict;
    used to start fine-tuning from an unsupervised checkpoint (``init_checkpoint``). Returns the
    checkpoint dict.

    Raises:
        ValueError: the keys or shapes differ; the message names the missing, unexpected and
            mis-shaped keys.
    """
    payload = read_checkpoint(path)
    state = _model_state(payload, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing keys {_few(missing)}, unexpected keys "
            f"{_few(unexpected)}, mis-shaped {_few(mis_shaped)}"
        )
    model.load_state_dict(state, strict=True)
    return payload


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    sgd: torch.optim.Optimizer | None = None,
    adamw: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Restore the model (strictly) and, when given, both optimisers and the grad scaler.

    The global RNGs are not touched (see :func:`set_rng_state`). Returns the checkpoint dict.

    Raises:
        ValueError: the model does not fit, or an optimiser/scaler state is asked for but absent.
    """
    payload = load_model_weights(path, model)
    for name, target in (("sgd", sgd), ("adamw", adamw), ("scaler", scaler)):
        if target is None:
            continue
        if name not in payload:
            raise ValueError(f"checkpoint {path} has no '{name}' state; resume needs a last.pt")
        if payload[name]:  # a disabled grad scaler (fp32 or bf16 run) saves an empty state
            target.load_state_dict(payload[name])
    return payload
