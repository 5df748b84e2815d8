"""DANet for scene segmentation: model, datasets, evaluation, prediction, training.

The attention modules come from :mod:`danet_kernels`; the model never names a backend.
``danet.DANet`` and ``danet.build_model`` are :mod:`danet.models`' own, imported on first use
so that ``import danet`` stays light.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY_MODEL_NAMES = ("DANet", "build_model")


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODEL_NAMES:
        from danet import models  # lazy: start-up time (`import danet` stays torch-free)

        return getattr(models, name)
    raise AttributeError(f"module 'danet' has no attribute {name!r}")
