"""fss_core.inference."""
