#!/bin/sh
# Sidecar container entrypoint: fill envoy/bootstrap.yaml's ${VARS} from the environment
# (envsubst, only the variables listed below) and exec Envoy. The container twin of
# sluice/local/envoy.py, which fills the same template for local sidecars.
#
# Required: NODE_ID SERVICE ROLE INGRESS_PORT SERVICE_PORT XDS_HOST
# Optional: PROTOCOL (http) EGRESS_PORT (0) GRPC_PORT (0) ADMIN_ADDRESS (127.0.0.1)
#           ADMIN_PORT (9901) XDS_PORT (18000) XDS_API (DELTA_GRPC, or GRPC for state of the world)
#           XDS_CA_FILE (/etc/sluice/xds/ca.crt: the mesh CA, which signed the manager's certificate)
#           XDS_TOKEN, or XDS_TOKEN_FILE (/etc/sluice/xds/token): this node's xDS token
#             (python -m manager.ca bootstrap writes both files per node)
#           ENVOY_LOG_LEVEL (warning)
#           ENVOY_CONCURRENCY (1) ENVOY_TEMPLATE ENVOY_CONFIG (paths)
# Extra arguments go to Envoy (e.g. --mode validate).
set -eu

: "${NODE_ID:?NODE_ID is required}" "${SERVICE:?SERVICE is required}" "${ROLE:?ROLE is required}"
: "${INGRESS_PORT:?INGRESS_PORT is required}" "${SERVICE_PORT:?SERVICE_PORT is required}" "${XDS_HOST:?XDS_HOST is required}"
export NODE_ID SERVICE ROLE INGRESS_PORT SERVICE_PORT XDS_HOST
export PROTOCOL="${PROTOCOL:-http}" EGRESS_PORT="${EGRESS_PORT:-0}" GRPC_PORT="${GRPC_PORT:-0}"
export ADMIN_ADDRESS="${ADMIN_ADDRESS:-127.0.0.1}" ADMIN_PORT="${ADMIN_PORT:-9901}" XDS_PORT="${XDS_PORT:-18000}"
export XDS_API="${XDS_API:-DELTA_GRPC}"
export XDS_CA_FILE="${XDS_CA_FILE:-/etc/sluice/xds/ca.crt}"
if [ -z "${XDS_TOKEN:-}" ]; then
  token_file="${XDS_TOKEN_FILE:-/etc/sluice/xds/token}"
  [ -r "$token_file" ] || { echo "no xDS token: set XDS_TOKEN, or XDS_TOKEN_FILE (not readable: $token_file)" >&2; exit 1; }
  XDS_TOKEN=$(cat "$token_file")
fi
export XDS_TOKEN

template="${ENVOY_TEMPLATE:-/etc/envoy/bootstrap.yaml}"
config="${ENVOY_CONFIG:-/tmp/envoy.yaml}"
vars='${NODE_ID} ${SERVICE} ${ROLE} ${PROTOCOL} ${INGRESS_PORT} ${SERVICE_PORT} ${EGRESS_PORT} ${GRPC_PORT} ${ADMIN_ADDRESS} ${ADMIN_PORT} ${XDS_HOST} ${XDS_PORT} ${XDS_API} ${XDS_CA_FILE} ${XDS_TOKEN}'
envsubst "$vars" <"$template" >"$config"

exec envoy -c "$config" \
  --concurrency "${ENVOY_CONCURRENCY:-1}" \
  --disable-hot-restart \
  --drain-time-s 1 \
  --log-level "${ENVOY_LOG_LEVEL:-warning}" \
  "$@"
