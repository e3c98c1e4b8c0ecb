"""The model repository: scans model directories and serves each model's metadata,
file list and files over HTTP. Entry point: ``python -m repository``.
"""
