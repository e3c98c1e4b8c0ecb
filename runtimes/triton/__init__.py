"""The Triton runtime kind: an adapter for real Triton servers and a CPU fallback.

* ``config``: config.pbtxt -> signatures and batching settings;
* ``batching``: the asyncio dynamic batcher;
* ``fallback``: ``load(artifact) -> Model``, serves Triton-layout ONNX models with
  onnxruntime, honouring config.pbtxt (this kind's loader for the SDK);
* ``remote``: lists a real Triton server's models and signatures, to register it.
"""
