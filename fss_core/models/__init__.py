"""fss_core.models."""
