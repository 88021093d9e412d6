"""sharpflow: SGD and the sharpest directions of the loss."""

__version__ = "0.1.0"
