"""The data-plane entry: runs pipelines stage by stage through its Envoy sidecar.
Entry point: ``python -m gateway``.
"""
