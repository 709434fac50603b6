"""The HTTP API. It never imports torch, transformers or the worker."""
