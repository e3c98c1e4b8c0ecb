"""The control plane: pipelines and runtimes over REST, SQLite persistence, and the
xDS (ADS) server that configures every Envoy sidecar. Entry point: ``python -m manager``.
"""
