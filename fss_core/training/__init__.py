"""fss_core.training."""
