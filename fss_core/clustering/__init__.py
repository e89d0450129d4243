"""fss_core.clustering — Dask k-means of the pixel embeddings (Stage B)."""

from fss_core.clustering.kmeans import (
    KMeansResult,
    assign,
    clustering_images,
    kmeans_fit,
    nearest_centroid_scores,
    valid_vectors,
)

__all__ = ["KMeansResult", "assign", "clustering_images", "kmeans_fit", "nearest_centroid_scores",
           "valid_vectors"]
