"""The model repository: scans model directories and serves each model's metadata,
file list and files over HTTP, and takes uploads of new models and new (immutable)
versions, and deletes. Entry point: ``python -m repository``.

Modules, one job each: ``catalog`` (what is on disk), ``app`` (the HTTP routes),
``views`` (the JSON about a model), ``manifests`` (model.json / config.pbtxt: valid?
what signature?), ``paths`` (is a client's path safe?), ``unpack`` (tar / multipart
body -> files), ``upload`` (a new version, atomically), ``delete``, ``staging``
(where writes are prepared; per-model locks), ``digests`` (SHA-256 cache),
``schemas`` (OpenAPI shapes), ``settings``.
"""
