"""gpufleet operations: one module per concern, each exposing ``@deploy`` functions and its facts beside it."""
