"""The label that excludes a position from the loss: PyTorch's cross_entropy `ignore_index`
default and the value HF models use for masked labels."""

IGNORE_INDEX = -100
