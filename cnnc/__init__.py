"""cnnc: an ahead-of-time compiler for convolutional networks with explicit multi-device parallelism."""

__version__ = "0.1.0"
