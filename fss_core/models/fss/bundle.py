"""A trained FSS model on disk: ``model.json`` (what to build) + ``weights.pt`` (state dict).

The state dict includes the frozen backbone, so a bundle needs no other file to load. The
same bundle feeds evaluation, ``fss predict`` and the MLflow pyfunc model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fss_core.models.backbones import build_backbone
from fss_core.models.fss.network import FSSModelConfig, FSSNetwork
from fss_core.torch_files import load_tensors

SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the network, and the input size it was trained at."""

    backbone: str
    image_size: int
    config: FSSModelConfig

    def to_json(self) -> str:
        return json.dumps({"backbone": self.backbone, "image_size": self.image_size,
                           "config": dataclasses.asdict(self.config)}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = SPEC_FILE) -> ModelSpec:
        """The spec ``text`` describes; a malformed one raises ValueError naming ``source`` (the
        file it came from) and what is wrong."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: not a JSON object")
        missing = [field for field in ("backbone", "image_size", "config") if field not in raw]
        if missing:
            raise ValueError(f"{source}: missing field {', '.join(repr(field) for field in missing)}")
        try:
            return cls(raw["backbone"], int(raw["image_size"]), FSSModelConfig(**raw["config"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: not a valid model spec: {exc}") from exc


def build_model(spec: ModelSpec, backbone_checkpoint: str | os.PathLike | None = None) -> FSSNetwork:
    """A fresh network for ``spec`` (backbone weights from ``backbone_checkpoint`` if given)."""
    return FSSNetwork(build_backbone(spec.backbone, checkpoint=backbone_checkpoint), spec.config)


def save_bundle(folder: str | os.PathLike, model: FSSNetwork, spec: ModelSpec) -> Path:
    """Write ``folder/model.json`` and ``folder/weights.pt`` (atomically, weights first)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in ((WEIGHTS_FILE, lambda p: torch.save(model.state_dict(), p)),
                        (SPEC_FILE, lambda p: p.write_text(spec.to_json()))):
        tmp = folder / f".{name}.tmp{os.getpid()}"
        write(tmp)
        os.replace(tmp, folder / name)
    return folder


def is_bundle(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a model bundle's two files."""
    folder = Path(folder)
    return (folder / SPEC_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _bundles_below(folder: Path, limit: int = 5) -> list[Path]:
    """Bundles one or two levels below ``folder`` (a workspace holds them in ``models/``), newest first."""
    if not folder.is_dir():
        return []
    specs = [*folder.glob(f"*/{SPEC_FILE}"), *folder.glob(f"*/*/{SPEC_FILE}")]
    found = [spec.parent for spec in specs if is_bundle(spec.parent)]
    return sorted(found, key=lambda p: (p / WEIGHTS_FILE).stat().st_mtime, reverse=True)[:limit]


def load_bundle(folder: str | os.PathLike, map_location: str = "cpu") -> tuple[FSSNetwork, ModelSpec]:
    """Rebuild the network of a bundle and load its weights strictly; returns it in eval mode."""
    folder = Path(folder)
    if not is_bundle(folder):
        inside = _bundles_below(folder)
        hint = f"; the bundles in it: {', '.join(str(b) for b in inside)}" if inside else ""
        raise FileNotFoundError(f"{folder} is not a model bundle (needs {SPEC_FILE} and {WEIGHTS_FILE}){hint}")
    spec = ModelSpec.from_json((folder / SPEC_FILE).read_text(), source=str(folder / SPEC_FILE))
    model = build_model(spec)
    state = load_tensors(folder / WEIGHTS_FILE, map_location=map_location)
    model.load_state_dict(state, strict=True)
    return model.eval(), spec
