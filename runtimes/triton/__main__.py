"""``python -m runtimes.triton``: serve Triton-layout models with the CPU fallback.

Each model named in ``SLUICE_RUNTIME_MODELS`` is fetched from the repository in
Triton's own layout (``config.pbtxt`` + ``<version>/model.onnx``) and served by
``runtimes.triton.fallback`` over OIP v2 gRPC, with config.pbtxt's signature,
``max_batch_size`` and dynamic batching. A real Triton server needs none of this:
it registers with the manager like any OIP server (``python -m runtimes.triton.register``).
"""

from runtimes.sdk.app import main
from runtimes.triton.fallback import load

if __name__ == "__main__":
    main("triton", load)
