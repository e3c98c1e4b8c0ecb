"""Runtime discovery behind one interface: the embedded registry (default) or Consul.

Both give the manager the same thing: for each runtime name, its healthy endpoints,
and a callback whenever that changes. The manager turns them into EDS endpoints.
"""

from manager.registry.base import Endpoint, Registry

__all__ = ["Endpoint", "Registry"]
