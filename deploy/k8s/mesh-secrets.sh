#!/usr/bin/env bash
# Prints (YAML on stdout) the mesh's Secrets for deploy/k8s, made by the project's own
# `python -m manager.ca bootstrap`:
#   sluice-mesh-ca         ca.key, ca.crt, xds-join.key    (mounted by the manager only)
#   sluice-xds-<service>   ca.crt, token                    (that service's sidecars)
# Each token names a node id prefix (manager/xds/auth.py): "runtime-scikit-*" admits
# every pod's node id runtime-scikit-<pod name> for role runtime and service scikit
# only, so replicas share one Secret and still connect to xDS as distinct nodes.
#
#   deploy/k8s/mesh-secrets.sh [DATA_DIR] | kubectl apply -n sluice -f -
#
# DATA_DIR keeps the CA key and the join secret between runs (reused when present);
# without it they live in a temporary folder that is removed, so a second run makes a
# new mesh CA (every pod must then restart). Run from the repository root (PYTHON:
# the interpreter with Sluice installed, default python3); needs kubectl (client only).
set -euo pipefail
python=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
data=${1:-$tmp/data}

# service:role:node id prefix
nodes=(manager:service:manager- repository:service:repository- gateway:gateway:gateway-
       scikit:runtime:runtime-scikit- spark:runtime:runtime-spark- triton:runtime:runtime-triton-)
specs=()
for n in "${nodes[@]}"; do
  IFS=: read -r service role prefix <<<"$n"
  specs+=("${prefix}*:${role}:${service}")
done
"$python" -m manager.ca bootstrap --data "$data" --out "$tmp/nodes" "${specs[@]}" >&2

secret() { kubectl create secret generic "$@" --dry-run=client -o yaml; }
secret sluice-mesh-ca --from-file=ca.key="$data/ca.key" --from-file=ca.crt="$data/ca.crt" \
  --from-file=xds-join.key="$data/xds-join.key"
for n in "${nodes[@]}"; do
  IFS=: read -r service role prefix <<<"$n"
  echo "---"
  secret "sluice-xds-$service" --from-file=ca.crt="$tmp/nodes/${prefix}*/ca.crt" \
    --from-file=token="$tmp/nodes/${prefix}*/token"
done
