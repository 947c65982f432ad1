"""mixq: fit a neural network to a budget with the least loss of quality.

The pipeline, one module or folder per stage:
data -> capture -> (profile -> plan) -> quantize -> evaluate -> export.
"""

__version__ = "0.1.0"
