"""Code every Sluice service shares: settings, logging, errors, tensor codecs,
Envoy sidecar bootstraps, process supervision and the ``sluice`` CLI.

Nothing here imports a service package (manager, gateway, runtimes, repository):
services talk over the network only, and the CLI starts them as processes.
"""
