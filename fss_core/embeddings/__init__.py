"""fss_core.embeddings."""
