"""fss_core — the science of the label-free few-shot segmentation pipeline.

A plain library: data readers and preparation, backbones and the prototype
cross-attention FSS model, embeddings, clustering, pseudo masks, training and
evaluation. It never imports Prefect or MLflow; orchestration lives in ``tasks/``
and ``flows/``.
"""

__version__ = "0.1.0"
