"""Example models and the deterministic scripts that train them (``python -m models.build``)."""
