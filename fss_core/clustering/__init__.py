"""fss_core.clustering."""
