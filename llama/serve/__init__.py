"""Serving: continuous batching over a paged KV cache (llama.serve.engine), layered on the reference model
from outside. See docs/serving.md."""
