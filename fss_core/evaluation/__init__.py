"""fss_core.evaluation."""
