"""The xDS v3 control plane: resources per sidecar, snapshots, and the ADS server."""
