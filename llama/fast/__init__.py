"""The fast path, layered on the reference from outside: layers swapped in after loading (layers.py) and the
batched decode loop with its optionally compiled step (loop.py); int8 weight-only layers swapped in the same way
(quantize.py). Tests prove it gives the reference's numbers."""
