"""Fused attention kernels for DANet (Dual Attention Network for scene segmentation).

Public API:

* :func:`position_attention` (PAM) and :func:`channel_attention` (CAM): functional forms,
  validated once, run by the backend the switch picks (Triton, blockwise PyTorch, reference);
* :class:`PAM_Module` and :class:`CAM_Module`: drop-in replacements for the original
  modules, loading their checkpoints unchanged;
* :func:`convert`: swaps the attention modules of an existing model (the original release's,
  mmsegmentation's DAHead, SAGAN blocks, mmcv's non-local blocks) for fused ones, in one call;
* :func:`set_backend`, :func:`use_backend`, :func:`get_backend`: the one backend switch;
* :mod:`danet_kernels.reference`: the plain bmm oracle.
"""

from danet_kernels import reference
from danet_kernels._dispatch import BACKENDS, get_backend, set_backend, use_backend
from danet_kernels.convert import convert
from danet_kernels.functional import channel_attention, position_attention
from danet_kernels.modules import CAM_Module, PAM_Module

__all__ = [
    "BACKENDS",
    "CAM_Module",
    "PAM_Module",
    "channel_attention",
    "convert",
    "get_backend",
    "position_attention",
    "reference",
    "set_backend",
    "use_backend",
]

__version__ = "0.1.0"
