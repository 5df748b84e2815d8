"""Names the command line offers and the modules that use them share: one definition, torch-free.

``danet --help`` must answer without importing torch (danet/cli.py), while the modules that act
on these names (inference, the model's heads, predict, export, the LR policies) import it;
both read them here, and so does the config's validation (danet/config.py).
"""

from __future__ import annotations

__all__ = ["ATTENTIONS", "DEVICES", "EXPORT_FORMATS", "HEAD_OUTPUTS", "INFERENCE_AMP", "INFERENCE_MODES",
           "INFERENCE_PROTOCOLS", "LR_POLICIES", "OUTPUT_STRIDES", "PREDICT_FORMATS"]

OUTPUT_STRIDES: tuple[int, ...] = (8, 16)
"""The dilated backbone's output strides (``model.output_stride``)."""
ATTENTIONS: tuple[str, ...] = ("fused", "reference")
"""Attention implementations: danet_kernels' fused kernels, or the reference bmm modules."""
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
"""Where a command runs: "auto" is CUDA when available."""
LR_POLICIES: tuple[str, ...] = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
"""Learning-rate policies, Caffe's set (danet.lr_policies)."""

INFERENCE_PROTOCOLS: tuple[str, ...] = ("danet", "release", "mmseg")
"""Evaluation protocols (docs/evaluation.md): ours, the DANet release's, mmsegmentation's."""
INFERENCE_MODES: tuple[str, ...] = ("whole", "sliding", "multiscale")
"""Inference modes: the whole image, sliding windows, several scales (with sliding windows)."""
INFERENCE_AMP: tuple[str, ...] = ("auto", "none", "bf16", "fp16")
"""Autocast for inference: "auto" is bf16 on CUDA and none on the CPU."""
HEAD_OUTPUTS: tuple[str, ...] = ("sum", "pam", "cam")
"""DANet's head outputs, in the order the original head returns them."""
PREDICT_FORMATS: tuple[str, ...] = ("palette", "cityscapes")
"""``danet predict`` outputs: palette masks and overlays, or Cityscapes label-id PNGs."""
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torch-export")
"""``danet export`` formats."""
