"""The manager's own TLS, from its CA (``manager.ca``):

* server credentials for its gRPC server (ADS for sidecars, PipelineDiscovery for
  gateways): a certificate for ``spiffe://sluice/manager`` (DNS ``manager.sluice``),
  re-issued at two thirds of its life and picked up by new connections;
* client credentials for its own calls to runtimes (ModelMetadata when a runtime
  registers, model loads and unloads): the same identity, which a runtime's sidecar
  accepts beside the gateway's. ``runtime_channel`` opens such a channel, checking that
  the server is the sidecar of the named runtime (its DNS SAN
  ``<name>.runtime.sluice``).

The process-wide instance is set once by ``manager.app.create`` (``install``).
"""

from __future__ import annotations

import threading
import time

import grpc

from manager.ca import MANAGER_ID, CertificateAuthority, Issued, dns_name

#: the name gRPC clients check on the manager's server certificate
MANAGER_TLS_NAME = dns_name("manager", "manager")


class ManagerTls:
    def __init__(self, ca: CertificateAuthority, cert_ttl_s: float = 3600.0):
        self.ca = ca
        self.cert_ttl_s = cert_ttl_s
        self._lock = threading.Lock()
        self._server: Issued | None = None
        self._client: Issued | None = None
        self._client_credentials: grpc.ChannelCredentials | None = None

    # --- the manager's server certificate (xDS + PipelineDiscovery)
    def _server_cert(self) -> Issued:
        with self._lock:
            if self._server is None or time.time() >= self._server.renew_at:
                self._server = self.ca.issue(MANAGER_ID, [MANAGER_TLS_NAME, "localhost"], self.cert_ttl_s, ips=("127.0.0.1",))
            return self._server

    def _server_config(self) -> grpc.ServerCertificateConfiguration:
        issued = self._server_cert()
        return grpc.ssl_server_certificate_configuration([(issued.key_pem, issued.cert_pem)])

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS for the xDS/PipelineDiscovery port. Clients prove who they are with a node
        token (``manager.xds.auth``), not a certificate: they get theirs over this channel."""
        served = [self._server_cert()]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # called by gRPC on each new connection: a renewed certificate from then on
            current = self._server_cert()
            if current is served[0]:
                return None
            served[0] = current
            return grpc.ssl_server_certificate_configuration([(current.key_pem, current.cert_pem)])

        return grpc.dynamic_ssl_server_credentials(self._server_config(), fetch, require_client_authentication=False)

    @property
    def server_serial(self) -> int:
        return self._server_cert().serial

    # --- the manager as a client of runtimes
    def client_credentials(self) -> grpc.ChannelCredentials:
        with self._lock:
            if self._client is None or time.time() >= self._client.renew_at:
                self._client = self.ca.issue(MANAGER_ID, [MANAGER_TLS_NAME], self.cert_ttl_s)
                self._client_credentials = grpc.ssl_channel_credentials(
                    root_certificates=self._client.ca_pem,
                    private_key=self._client.key_pem,
                    certificate_chain=self._client.cert_pem,
                )
            return self._client_credentials

    def runtime_channel(self, host: str, port: int, runtime: str, options: list | None = None) -> grpc.aio.Channel:
        """A channel to runtime ``runtime``'s sidecar at ``host:port``, over mTLS."""
        return grpc.aio.secure_channel(
            f"{host}:{port}",
            self.client_credentials(),
            options=[("grpc.ssl_target_name_override", dns_name("runtime", runtime)), *(options or [])],
        )


_installed: ManagerTls | None = None


def install(tls: ManagerTls) -> None:
    global _installed
    _installed = tls


def current() -> ManagerTls:
    if _installed is None:
        raise RuntimeError("the manager's TLS is not set up (manager.tls.install)")
    return _installed


def runtime_channel(host: str, port: int, runtime: str) -> grpc.aio.Channel:
    """A channel to a runtime's sidecar with the manager's client certificate."""
    return current().runtime_channel(host, port, runtime)
