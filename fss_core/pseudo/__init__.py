"""fss_core.pseudo."""
