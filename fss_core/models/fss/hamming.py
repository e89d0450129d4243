"""Support prototypes: SimHash codes clustered by Hamming k-means.

Hundreds or thousands of (noisy, pseudo-labelled) support tokens are compressed into a few
fg/bg region prototypes that the query attends to. Every random draw (hyperplanes, k-means
initialisation, tied majority bits, re-seeded empty clusters) comes from an explicit
``torch.Generator``, so a seeded evaluation is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

COUNT_EPS = 1e-3


def _generator_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def simhash(tokens: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Random-hyperplane hash codes with offsets.

    Args:
        tokens: ``[L, C]``.
        planes: ``[bits, C + 1]``; the last column is the offset of each hyperplane.

    Returns:
        ``[L, bits]`` bool, bit b = ``<x, planes[b, :C]> > planes[b, C]``.
    """
    channels = tokens.shape[1]
    if planes.shape[1] != channels + 1:
        raise ValueError(f"simhash: planes have {planes.shape[1]} columns, expected {channels + 1}")
    return tokens @ planes[:, :channels].T > planes[:, channels]


def _nearest_code(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the centroid at the smallest Hamming distance (first one on ties). Inputs are 0/1 floats."""
    # |x xor c| = |x| + |c| - 2<x, c> for 0/1 vectors; exact in float for <= 2^24 bits.
    distance = codes.sum(1, keepdim=True) + centroids.sum(1) - 2 * codes @ centroids.T
    return distance.argmin(1)


def hamming_kmeans(
    codes: torch.Tensor, k: int, iterations: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Lloyd's k-means on binary codes under the Hamming distance.

    Initialised with k codes drawn without replacement; each iteration assigns every code to
    its nearest centroid and sets each centroid to the per-bit majority of its members. A tied
    bit takes a random value, so an empty cluster (all bits tied) is re-seeded with a random
    code. A final assignment follows the last iteration.

    Args:
        codes: ``[L, bits]`` bool, ``L >= k``.
        k: number of clusters.
        iterations: Lloyd iterations before the final assignment.
        generator: source of all random draws (the global RNG when None).

    Returns:
        ``[L]`` long cluster index in ``[0, k)``.
    """
    n_codes, bits = codes.shape
    if not 1 <= k <= n_codes:
        raise ValueError(f"hamming_kmeans: need 1 <= k <= number of codes, got k={k}, codes={n_codes}")
    device = codes.device
    draw_device = _generator_device(generator, device)
    points = codes.to(torch.float32)
    start = torch.randperm(n_codes, generator=generator, device=draw_device)[:k].to(device)
    centroids = points[start]
    for _ in range(iterations):
        members = F.one_hot(_nearest_code(points, centroids), k).to(torch.float32)  # [L, k]
        ones = members.T @ points  # [k, bits]
        counts = members.sum(0)[:, None]  # [k, 1]
        random_bits = torch.randint(0, 2, (k, bits), generator=generator, device=draw_device).to(device)
        majority = (2 * ones > counts).to(torch.float32)
        centroids = torch.where(2 * ones == counts, random_bits.to(torch.float32), majority)
    return _nearest_code(points, centroids)


def cluster_prototypes(
    tokens: torch.Tensor,
    k: int,
    bits: int,
    iterations: int,
    generator: torch.Generator | None = None,
    mask_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress tokens into at most k cluster means (un-normalised).

    With at most k tokens the tokens themselves are the prototypes. Otherwise tokens are
    SimHash-coded with ``bits`` fresh hyperplanes ~ N(0, I) and clustered by Hamming k-means;
    prototype_k = sum of members / (n_k + 1e-3). Assignments carry no gradient; prototypes
    are differentiable with respect to the tokens.

    Args:
        tokens: ``[L, C]`` (L may be 0).
        mask_empty: mark empty clusters invalid (the fix). With False they stay valid zero
            prototypes, as in the reference. Unused slots (at most k tokens) are invalid either way.

    Returns:
        prototypes ``[k, C]`` (zeros in unused slots and empty clusters) and valid ``[k]`` bool
        (False for unused slots, and for empty clusters when ``mask_empty``).
    """
    n_tokens, channels = tokens.shape
    device = tokens.device
    if n_tokens <= k:
        prototypes = torch.cat([tokens, tokens.new_zeros(k - n_tokens, channels)])
        valid = torch.arange(k, device=device) < n_tokens
        return prototypes, valid
    with torch.no_grad():
        planes = torch.randn(bits, channels + 1, generator=generator, device=_generator_device(generator, device))
        codes = simhash(tokens.detach().to(torch.float32), planes.to(device))
        assignment = hamming_kmeans(codes, k, iterations, generator)
    members = F.one_hot(assignment, k).to(tokens.dtype)  # [L, k]
    counts = members.sum(0)
    prototypes = members.T @ tokens / (counts[:, None] + COUNT_EPS)
    if not mask_empty:
        return prototypes, torch.ones(k, dtype=torch.bool, device=device)
    return prototypes, counts > 0


def guard_foreground(foreground: torch.Tensor) -> torch.Tensor:
    """Make every support mask have both fg and bg cells.

    An empty mask gets its central 2x2 cells as fg; a full mask gets its 4 corners as bg.

    Args:
        foreground: ``[N, h, w]`` bool.

    Returns:
        ``[N, h, w]`` bool.
    """
    _, h, w = foreground.shape
    centre = torch.zeros(h, w, dtype=torch.bool, device=foreground.device)
    centre[max(h // 2 - 1, 0) : h // 2 + 1, max(w // 2 - 1, 0) : w // 2 + 1] = True
    corners = torch.zeros_like(centre)
    corners[[0, 0, -1, -1], [0, -1, 0, -1]] = True
    flat = foreground.flatten(1)
    empty = ~flat.any(1)[:, None, None]
    full = flat.all(1)[:, None, None]
    foreground = torch.where(empty, centre, foreground)
    return torch.where(full, foreground & ~corners, foreground)


def support_prototypes(
    features: torch.Tensor,
    foreground: torch.Tensor,
    padding: torch.Tensor,
    fg_prototypes: int,
    bg_prototypes: int,
    bits: int,
    iterations: int,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    mask_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fg/bg prototypes of each episode's support tokens (all shots pooled).

    Masks are first guarded per shot (:func:`guard_foreground`), then padded cells are dropped
    and the fg and bg tokens are clustered separately.

    Args:
        features: ``[B, S, C, h, w]`` support tokens.
        foreground: ``[B, S, h, w]`` bool, fg cells (everything else is bg).
        padding: ``[B, S, h, w]`` bool, True at padded cells (dropped).
        fg_prototypes, bg_prototypes: slots for fg and bg prototypes.
        bits: SimHash code length.
        iterations: Hamming k-means iterations.
        generator: source of the random draws: one for the whole batch (episode b draws after
            episodes 0..b-1), or one per episode, so that an episode's prototypes do not depend
            on the other episodes in its batch.
        mask_empty: mark empty clusters invalid (see :func:`cluster_prototypes`).

    Returns:
        prototypes ``[B, fg_prototypes + bg_prototypes, C]``, L2-normalised, fg slots first;
        invalid ``[B, fg_prototypes + bg_prototypes]`` bool, True for unused slots, and for
        empty clusters when ``mask_empty``.
    """
    batch, shots, channels, h, w = features.shape
    if foreground.shape != (batch, shots, h, w) or padding.shape != (batch, shots, h, w):
        raise ValueError(
            f"support_prototypes: features {tuple(features.shape)} need foreground and padding of shape "
            f"{(batch, shots, h, w)}, got {tuple(foreground.shape)} and {tuple(padding.shape)}"
        )
    foreground = guard_foreground(foreground.flatten(0, 1)).view(batch, -1)
    keep = ~padding.reshape(batch, -1)
    tokens = features.permute(0, 1, 3, 4, 2).reshape(batch, shots * h * w, channels)
    prototypes, valid = [], []
    per_episode = isinstance(generator, (list, tuple))
    if per_episode and len(generator) != batch:
        raise ValueError(f"support_prototypes: {len(generator)} generators for a batch of {batch} episodes")
    for b in range(batch):
        g = generator[b] if per_episode else generator
        fg_tokens, bg_tokens = tokens[b][foreground[b] & keep[b]], tokens[b][~foreground[b] & keep[b]]
        fg, fg_valid = cluster_prototypes(fg_tokens, fg_prototypes, bits, iterations, g, mask_empty)
        bg, bg_valid = cluster_prototypes(bg_tokens, bg_prototypes, bits, iterations, g, mask_empty)
        prototypes.append(torch.cat([fg, bg]))
        valid.append(torch.cat([fg_valid, bg_valid]))
    return F.normalize(torch.stack(prototypes), dim=-1), ~torch.stack(valid)
