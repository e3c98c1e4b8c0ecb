"""Callers' credentials: API tokens with scopes (signed by the manager, checked by
Envoy), and which hosts runtimes may register at.

* ``keys``: the ES256 signing key (a file of mode 0600 next to the database);
* ``tokens``: issue, list, revoke and verify tokens (the store keeps ids, scopes,
  expiry and revocation, never a token);
* ``scopes``: the scope names and the caller a verified payload names;
* ``networks``: ``SLUICE_MANAGER_RUNTIME_NETWORKS`` and host resolution off the loop;
* ``api``: ``/api/v1/tokens``.

What Envoy is told to check, per route, lives in ``manager.xds.ingress_auth``.
"""
