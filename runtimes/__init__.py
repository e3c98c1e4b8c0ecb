"""Model servers that speak the Open Inference Protocol v2 over gRPC.

``runtimes.sdk`` is the small shared layer (OIP servicer, model loading from the
repository, registration); ``runtimes.scikit``, ``runtimes.spark`` and
``runtimes.triton`` are runtime kinds, each started with ``python -m runtimes.<kind>``.
"""
