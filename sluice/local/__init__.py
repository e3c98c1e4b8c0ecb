"""The local launcher: what ``sluice up`` and the end-to-end tests start on one machine.

``mesh`` (the whole mesh as processes, in order, each ready-checked), ``envoy`` (an
Envoy sidecar: the real binary and its bootstrap), ``zipkin`` (the real Zipkin
server's jar), ``procs`` (process supervision, stopped by PID). Services never import
this package: in containers, compose and Kubernetes start them instead.
"""
