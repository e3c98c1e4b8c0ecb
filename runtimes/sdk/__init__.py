"""The runtime SDK: what every Sluice runtime kind shares.

A runtime kind supplies one function, ``load(artifact) -> Model``; the SDK serves the
models over OIP v2 gRPC (``server``), keeps the versions it serves in one set that
loads and unloads them at run time (``models``, driven by OIP's model-repository
extension), fetches their files from the repository (``repository``), and announces
the runtime to the registry (``registration``).
"""

from runtimes.sdk.model import Model, ModelArtifact, ModelLoadError

__all__ = ["Model", "ModelArtifact", "ModelLoadError"]
