"""Segmentation metrics from a confusion matrix: pixel accuracy, per-class IoU and mIoU.

The matrix is accumulated over a whole evaluation (not averaged per image), which is how
the published numbers are computed: ``pixAcc = sum(diag) / sum(all)`` and
``IoU_k = TP_k / (TP_k + FP_k + FN_k)``, over the pixels whose target is not ``ignore_index``.
A class that appears neither in the predictions nor in the targets has no IoU (NaN) and is
left out of the mean; a class predicted but never present gets IoU 0.

In distributed evaluation every process updates its own matrix on its shard of the data;
:meth:`ConfusionMatrix.reduce_from_all_processes` sums them (``all_reduce``) before
:meth:`ConfusionMatrix.compute`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """A ``(num_classes, num_classes)`` int64 count matrix: rows are targets, columns predictions.

    Args:
        num_classes: number of classes K; labels are ``0..K-1``.
        ignore_index: target value of pixels that are not counted (predictions there are ignored).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat: torch.Tensor | None = None  # created on the device of the first update

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch: ``pred`` and ``target`` integer tensors of one shape (e.g. (B, H, W)).

        Raises ValueError for mismatched shapes, non-integer dtypes, predictions outside
        ``0..K-1``, or targets outside ``0..K-1`` that are not ``ignore_index``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        for name, tensor in (("pred", pred), ("target", target)):
            if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
                raise ValueError(f"{name} must hold integer class ids, got dtype {tensor.dtype}")
        k = self.num_classes
        target = target.reshape(-1).to(device=pred.device, dtype=torch.int64)
        pred = pred.reshape(-1).to(torch.int64)
        keep = target != self.ignore_index
        bad_target = keep & ((target < 0) | (target >= k))
        bad_pred = keep & ((pred < 0) | (pred >= k))
        if bool((bad_target | bad_pred).any()):  # one host sync for both checks
            if bool(bad_target.any()):
                bad = torch.unique(target[bad_target])[:10].tolist()
                raise ValueError(
                    f"target values {bad} are outside 0..{k - 1} and not the ignore index {self.ignore_index}"
                )
            bad = torch.unique(pred[bad_pred])[:10].tolist()
            raise ValueError(f"predicted values {bad} are outside 0..{k - 1}")
        # Ignored pixels go to one extra bin that is dropped, instead of a boolean gather.
        index = torch.where(keep, target * k + pred, k * k)
        counts = torch.bincount(index, minlength=k * k + 1)[: k * k].reshape(k, k)
        if self.mat is None:
            # A normal tensor even when the first update runs under torch.inference_mode (as
            # evaluation does): reset() and the all_reduce update it in place outside that mode.
            with torch.inference_mode(False):
                self.mat = torch.zeros((k, k), dtype=torch.int64, device=pred.device)
        self.mat += counts.to(self.mat.device)

    def reset(self) -> None:
        """Forgets every update."""
        if self.mat is not None:
            self.mat.zero_()

    def reduce_from_all_processes(self) -> None:
        """Sums the matrices of all processes (all_reduce) when torch.distributed is initialised.

        A no-op in a single process. Call it once, after the last update and before
        :meth:`compute`, on every process (it is a collective): a second call would add the
        already-summed matrices again.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.mat is None:
            # A process that saw no data still has to take part in the collective.
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
            self.mat = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64, device=device)
        dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, float | list[float]]:
        """``{"pixAcc": float, "mIoU": float, "IoU": [float] * K}`` from the counts so far.

        IoU is NaN for a class absent from both predictions and targets; mIoU is the mean
        over the other classes. With no counted pixel at all every value is NaN.
        """
        k = self.num_classes
        mat = self.mat.double().cpu() if self.mat is not None else torch.zeros((k, k), dtype=torch.float64)
        true_positives = mat.diag()
        total = mat.sum()
        union = mat.sum(0) + mat.sum(1) - true_positives
        iou = torch.where(union > 0, true_positives / union.clamp(min=1), torch.full_like(union, math.nan))
        present = ~torch.isnan(iou)
        return {
            "pixAcc": float(true_positives.sum() / total) if total > 0 else math.nan,
            "mIoU": float(iou[present].mean()) if present.any() else math.nan,
            "IoU": iou.tolist(),
        }

    def __repr__(self) -> str:
        metrics = self.compute()
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, pixAcc={metrics['pixAcc']:.4f}, "
            f"mIoU={metrics['mIoU']:.4f})"
        )
