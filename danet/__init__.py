"""DANet for scene segmentation: model, datasets, evaluation, prediction, training.

The attention modules come from :mod:`danet_kernels`; the model never names a backend.
"""

__version__ = "0.1.0"
