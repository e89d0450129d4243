"""Optional randomized-PCA projection of the pixel embeddings, for large datasets.

A wide backbone (ResNet-50 layer4: 2048 channels) makes ``embeddings.zarr`` large and
k-means slow. :func:`fit_projection` fits a PCA on a sample of unprojected, L2-normalised
valid cells (``fss_core.embeddings.extract.sample_valid_vectors`` on a seeded subset of
images); extraction then stores ``Projection.apply(features)``, re-normalised to unit length
so k-means sees the same kind of vectors as without PCA.

The projection lives inside the embeddings store it produced, as two extra float32 arrays
next to ``features``: ``pca_mean [C_in]`` and ``pca_components [dim, C_in]``; the store's
``pca`` attribute is ``dim``. Rebuilding the store removes them with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from sklearn.decomposition import PCA

log = logging.getLogger(__name__)

MEAN_ARRAY = "pca_mean"
COMPONENTS_ARRAY = "pca_components"


@dataclass(frozen=True)
class Projection:
    """``x ↦ normalise(components · (x − mean))``.

    ``mean [C_in]``; ``components [dim, C_in]``, orthonormal rows (the principal axes).
    """

    mean: np.ndarray
    components: np.ndarray

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.components.ndim != 2 or self.components.shape[1] != self.mean.shape[0]:
            raise ValueError(f"projection needs mean [C] and components [dim, C], got {self.mean.shape} "
                             f"and {self.components.shape}")

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, C_in, G, G]`` → projected ``[B, dim, G, G]`` float32, unit L2 norm per cell."""
        if features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"projection expects {self.mean.shape[0]} channels, got {features.shape[1]}")
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=features.device).view(1, -1, 1, 1)
        components = torch.as_tensor(self.components, dtype=torch.float32, device=features.device)
        projected = torch.einsum("dc,bchw->bdhw", components, features.float() - mean)
        return F.normalize(projected, dim=1)


def fit_projection(vectors: np.ndarray, dim: int, seed: int) -> Projection:
    """Randomized PCA of ``vectors [n, C]`` float32 to ``dim`` components (``dim <= min(n, C)``)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [n, C], got shape {vectors.shape}")
    if not 1 <= dim <= min(vectors.shape):
        raise ValueError(f"PCA dim must lie in 1..{min(vectors.shape)} for {vectors.shape[0]} vectors of "
                         f"width {vectors.shape[1]}, got {dim}")
    pca = PCA(n_components=dim, svd_solver="randomized", random_state=seed).fit(vectors)
    log.info("PCA %d -> %d on %d vectors keeps %.1f%% of the variance", vectors.shape[1], dim,
             vectors.shape[0], 100 * float(pca.explained_variance_ratio_.sum()))
    return Projection(pca.mean_.astype(np.float32), pca.components_.astype(np.float32))


def save_projection(group: zarr.Group, projection: Projection) -> None:
    """Write ``projection`` into the embeddings store ``group`` (arrays ``pca_mean``, ``pca_components``).

    The components go last: until their data is written they read as zeros, which
    :func:`load_projection` treats as no projection, so a killed write is redone.
    """
    for name, data in ((MEAN_ARRAY, projection.mean), (COMPONENTS_ARRAY, projection.components)):
        group.create_array(name, shape=data.shape, dtype="float32", overwrite=True)[...] = data


def load_projection(group: zarr.Group) -> Projection | None:
    """The projection stored in ``group``, or None when it holds none or only part of one."""
    if MEAN_ARRAY not in group or COMPONENTS_ARRAY not in group:
        return None
    components = np.asarray(group[COMPONENTS_ARRAY][...], dtype=np.float32)
    norms = np.linalg.norm(components, axis=-1) if components.ndim == 2 else np.zeros(0)
    if not len(norms) or not np.all(np.abs(norms - 1) < 1e-2):  # principal axes have unit length
        log.warning("embeddings store %s holds an incompletely written PCA projection; it is refitted",
                    group.store_path)
        return None
    return Projection(np.asarray(group[MEAN_ARRAY][...], dtype=np.float32), components)
