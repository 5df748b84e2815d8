"""Segmentation metrics from a confusion matrix, in two conventions.

The matrix is accumulated over a whole evaluation (not averaged per image), over the pixels
whose target is not ``ignore_index``; both conventions compute their numbers from it:

* :meth:`ConfusionMatrix.compute`, mmsegmentation's (``IoUMetric``) and ours: ``aAcc =
  sum(TP) / sum(labelled)`` (= ``pixAcc``), ``IoU_k = TP_k / (TP_k + FP_k + FN_k)``, ``Acc_k =
  TP_k / labelled_k``; a class whose denominator is 0 has no value (NaN) and ``mIoU`` / ``mAcc``
  are the means over the classes that have one (numpy's nanmean). So a class absent from
  both predictions and targets is left out of mIoU, one predicted but never present counts
  as IoU 0 (and is left out of mAcc).
* :meth:`ConfusionMatrix.compute_release`, the DANet release's (PyTorch-Encoding's
  ``batch_pix_accuracy`` / ``batch_intersection_union`` / ``get_pixacc_miou``): labels shifted
  by one so that ignored pixels are 0, histograms over 1..K, ``pixAcc = correct / (eps +
  labelled)``, ``IoU_k = TP_k / (eps + union_k)`` with ``eps = np.spacing(1)``, and mIoU the mean
  over **all** K classes: a class absent from both counts as 0 (2 absent classes of 19 take
  about 0.1 x the mean off).

In distributed evaluation every process updates its own matrix on its shard of the data;
:meth:`ConfusionMatrix.reduce_from_all_processes` sums them (``all_reduce``) before
:meth:`ConfusionMatrix.compute`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_RELEASE_EPS = 2.220446049250313e-16  # np.spacing(1), the release's guard against empty denominators


def _nanmean(values: torch.Tensor) -> float:
    present = ~torch.isnan(values)
    return float(values[present].mean()) if present.any() else math.nan


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

    def counts(self) -> torch.Tensor:
        """The counts so far as a float64 CPU ``(K, K)`` tensor (zeros before any update)."""
        k = self.num_classes
        return self.mat.double().cpu() if self.mat is not None else torch.zeros((k, k), dtype=torch.float64)

    def compute(self) -> dict[str, float | list[float]]:
        """mmsegmentation's metrics (see the module docstring) from the counts so far.

        Returns ``{"aAcc", "mIoU", "mAcc": float, "IoU", "Acc": [float] * K, "pixAcc": float}``
        (``pixAcc`` is ``aAcc`` under the release's name). With no counted pixel every value is NaN.
        """
        mat = self.counts()
        true_positives = mat.diag()
        labelled = mat.sum(1)
        union = mat.sum(0) + labelled - true_positives
        nan = torch.full_like(union, math.nan)
        iou = torch.where(union > 0, true_positives / union.clamp(min=1), nan)
        acc = torch.where(labelled > 0, true_positives / labelled.clamp(min=1), nan)
        total = mat.sum()
        a_acc = float(true_positives.sum() / total) if total > 0 else math.nan
        return {"aAcc": a_acc, "mIoU": _nanmean(iou), "mAcc": _nanmean(acc), "IoU": iou.tolist(),
                "Acc": acc.tolist(), "pixAcc": a_acc}

    def compute_release(self) -> dict[str, float | list[float]]:
        """The DANet release's ``{"pixAcc", "mIoU": float, "IoU": [float] * K}`` (module docstring):
        absent classes count as IoU 0 in the mean; never NaN."""
        mat = self.counts()
        true_positives = mat.diag()
        union = mat.sum(0) + mat.sum(1) - true_positives
        iou = true_positives / (_RELEASE_EPS + union)
        return {"pixAcc": float(true_positives.sum() / (_RELEASE_EPS + mat.sum())), "mIoU": float(iou.mean()),
                "IoU": iou.tolist()}

    def __repr__(self) -> str:
        metrics = self.compute()
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, pixAcc={metrics['pixAcc']:.4f}, "
            f"mIoU={metrics['mIoU']:.4f})"
        )
