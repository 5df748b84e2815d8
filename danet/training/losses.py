"""The loss of the published DANet: cross entropy on each of its outputs, weighted and summed.

In training mode the model returns ``(sum_logits, pam_logits, cam_logits[, aux_logits])``; the
loss is ``w_sum * CE(sum) + w_pam * CE(pam) + w_cam * CE(cam) [+ aux_weight * CE(aux)]`` with
pixels labelled ``ignore_index`` left out (the original release's SegmentationMultiLosses uses
weights 1, 1, 1; the auxiliary FCN head of later reimplementations is weighted 0.4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

OUTPUT_NAMES: tuple[str, ...] = ("sum", "pam", "cam", "aux")


class DANetLoss(nn.Module):
    """Weighted sum of per-output cross entropies; ``forward`` returns (total, {name: term})."""

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        aux_weight: float = 0.4,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if len(weights) != 3:
            raise ValueError(f"loss weights: expected 3 values (sum, PAM, CAM), got {list(weights)}")
        if any(w < 0 for w in (*weights, aux_weight)):
            raise ValueError(f"loss weights must be >= 0, got {list(weights)} and aux {aux_weight}")
        self.weights = (*(float(w) for w in weights), float(aux_weight))
        self.ignore_index = ignore_index

    def forward(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``outputs``: the model's tuple (or one logits tensor, weighted 1); ``target``: int64 (B, H, W)."""
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        if not 1 <= len(outputs) <= 4:
            raise ValueError(f"expected 1 to 4 model outputs (sum, PAM, CAM[, aux]), got {len(outputs)}")
        terms: dict[str, torch.Tensor] = {}
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for name, weight, logits in zip(OUTPUT_NAMES, self.weights, outputs, strict=False):
            if logits.shape[-2:] != target.shape[-2:]:
                got, want = tuple(logits.shape[-2:]), tuple(target.shape[-2:])
                raise ValueError(f"{name} logits are {got} but the target is {want}")
            # fp32 cross entropy: under autocast the logits may be bf16/fp16
            term = functional.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
            terms[name] = term.detach()
            total = total + weight * term
        return total, terms

    def extra_repr(self) -> str:
        return f"weights={self.weights[:3]}, aux_weight={self.weights[3]}, ignore_index={self.ignore_index}"
