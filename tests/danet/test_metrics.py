"""ConfusionMatrix: hand-computed cases, ignored pixels, absent classes, bad input, 2-process reduction."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from danet.evaluation.metrics import ConfusionMatrix


def _reference_metrics(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> dict:
    """Straightforward float64 metrics from explicit per-class loops."""
    keep = target != ignore
    pred, target = pred[keep], target[keep]
    iou = []
    for c in range(k):
        tp = np.sum((pred == c) & (target == c))
        union = np.sum((pred == c) | (target == c))
        iou.append(tp / union if union else math.nan)
    return {"pixAcc": float(np.mean(pred == target)), "mIoU": float(np.nanmean(iou)), "IoU": iou}


def test_hand_computed_example():
    # targets (rows) / predictions: 0 0 | 0 1 | 1 1 | 1 2 | 2 2 | 2 2
    target = torch.tensor([[0, 0, 1, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 2, 2, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    metrics = cm.compute()
    assert metrics["pixAcc"] == pytest.approx(4 / 6)
    # IoU: class 0: 1/(1+1) ; class 1: 1/(1+1+1) ; class 2: 2/(2+1)
    assert metrics["IoU"] == pytest.approx([1 / 2, 1 / 3, 2 / 3])
    assert metrics["mIoU"] == pytest.approx((1 / 2 + 1 / 3 + 2 / 3) / 3)


def test_ignored_pixels_are_not_counted_whatever_is_predicted_there():
    target = torch.tensor([[0, 255, 1], [255, 1, 255]])
    pred = torch.tensor([[0, 1, 1], [7, 0, -3]])  # out-of-range predictions only where ignored
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    assert cm.mat.sum() == 3
    assert cm.mat.tolist() == [[1, 0], [1, 1]]
    assert cm.compute()["pixAcc"] == pytest.approx(2 / 3)


def test_custom_ignore_index():
    cm = ConfusionMatrix(2, ignore_index=-1)
    cm.update(torch.tensor([1, 1, 0]), torch.tensor([1, -1, 0]))
    assert cm.compute()["pixAcc"] == 1.0


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1, 3]), torch.tensor([0, 1, 0, 1]))
    iou = cm.compute()["IoU"]
    assert math.isnan(iou[2])  # never predicted, never present
    assert iou[3] == 0.0  # predicted but never present: a real zero
    assert iou[0] == pytest.approx(1 / 2) and iou[1] == pytest.approx(1 / 3)
    assert cm.compute()["mIoU"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)


@pytest.mark.parametrize("k", [1, 5, 19])
def test_matches_reference_over_several_updates(k):
    rng = np.random.default_rng(k)
    cm = ConfusionMatrix(k)
    preds, targets = [], []
    for shape in [(2, 7, 9), (1, 13, 5), (3, 4, 4)]:
        target = rng.integers(0, k, size=shape)
        target[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, k, size=shape)
        agree = (rng.random(shape) < 0.5) & (target != 255)  # a realistic share of correct pixels
        pred = np.where(agree, target, pred)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred.ravel())
        targets.append(target.ravel())
    expected = _reference_metrics(np.concatenate(preds), np.concatenate(targets), k, 255)
    got = cm.compute()
    assert got["pixAcc"] == pytest.approx(expected["pixAcc"])
    assert got["mIoU"] == pytest.approx(expected["mIoU"])
    np.testing.assert_allclose(got["IoU"], expected["IoU"], equal_nan=True)
    assert all(0.0 <= v <= 1.0 for v in (got["pixAcc"], got["mIoU"]))


def test_reset_and_empty():
    cm = ConfusionMatrix(3)
    assert torch.equal(cm.counts(), torch.zeros((3, 3), dtype=torch.float64))  # before any update
    empty = cm.compute()
    assert math.isnan(empty["pixAcc"]) and math.isnan(empty["mIoU"]) and all(map(math.isnan, empty["IoU"]))
    cm.update(torch.tensor([1]), torch.tensor([1]))
    cm.reset()
    assert cm.mat.sum() == 0
    cm.update(torch.tensor([2, 2]), torch.tensor([2, 0]))
    assert cm.compute()["pixAcc"] == 0.5
    counts = cm.counts()
    assert counts.dtype == torch.float64 and counts.tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 1]]


def test_updates_under_inference_mode_leave_a_normal_matrix():
    cm = ConfusionMatrix(2)
    with torch.inference_mode():
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
        cm.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert not cm.mat.is_inference()
    assert cm.mat.tolist() == [[1, 1], [0, 2]]
    cm.reset()  # an in-place update outside inference mode, like the all_reduce
    assert cm.mat.sum() == 0


def test_reduce_is_a_no_op_without_distributed():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    before = cm.mat.clone()
    cm.reduce_from_all_processes()
    assert torch.equal(cm.mat, before)


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (torch.tensor([0, 1]), torch.tensor([0, 3]), r"target values \[3\]"),
        (torch.tensor([0, 1]), torch.tensor([-2, 0]), r"target values \[-2\]"),
        (torch.tensor([0, 3]), torch.tensor([0, 1]), r"predicted values \[3\]"),
        (torch.tensor([0, 1, 1]), torch.tensor([0, 1]), "shape"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "dtype"),
        (torch.tensor([0, 1]), torch.tensor([True, False]), "dtype"),
    ],
)
def test_bad_input_is_rejected(pred, target, message):
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=message):
        cm.update(pred, target)


def test_bad_construction():
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(5, ignore_index=3)


def _reduce_worker(rank: int, world_size: int, workdir: str) -> None:
    init = f"file://{workdir}/rendezvous"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        cm = ConfusionMatrix(3)
        if rank == 0:
            with torch.inference_mode():  # as danet.evaluation.evaluate runs it
                cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
        # rank 1 sees no data at all: it must still join the collective
        cm.reduce_from_all_processes()
        (Path(workdir) / f"rank{rank}.json").write_text(json.dumps(cm.mat.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters importing torch: a few seconds of CPU
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_reduction(tmp_path):
    world_size = 2
    mp.spawn(_reduce_worker, args=(world_size, str(tmp_path)), nprocs=world_size)
    expected = [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    for rank in range(world_size):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


# ------------------------------------------------------------------ the two conventions, transcribed


def _mmseg_metrics(preds: list[torch.Tensor], labels: list[torch.Tensor], k: int, ignore: int) -> dict:
    """mmsegmentation's IoUMetric: intersect_and_union per image (torch.histc), summed, then
    total_area_to_metrics with nanmean summaries."""
    totals = [torch.zeros(k, dtype=torch.float64) for _ in range(4)]
    for pred, label in zip(preds, labels, strict=True):
        mask = label != ignore
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        area_intersect = torch.histc(intersect.float(), bins=k, min=0, max=k - 1)
        area_pred = torch.histc(pred.float(), bins=k, min=0, max=k - 1)
        area_label = torch.histc(label.float(), bins=k, min=0, max=k - 1)
        area_union = area_pred + area_label - area_intersect
        for total, area in zip(totals, (area_intersect, area_union, area_pred, area_label), strict=True):
            total += area.double()
    inter, union, _, label_area = (t.numpy() for t in totals)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou, acc = inter / union, inter / label_area
    return {"aAcc": inter.sum() / label_area.sum(), "IoU": iou, "Acc": acc, "mIoU": np.nanmean(iou),
            "mAcc": np.nanmean(acc)}


def _release_metrics(preds: list[torch.Tensor], labels: list[torch.Tensor], k: int, ignore: int) -> dict:
    """PyTorch-Encoding's batch_pix_accuracy / batch_intersection_union / get_pixacc_miou; its
    datasets mark ignored pixels with -1, so that the +1 shift makes them 0."""
    correct = labelled = 0
    inter_total, union_total = np.zeros(k), np.zeros(k)
    for pred, label in zip(preds, labels, strict=True):
        target = np.where(label.numpy() == ignore, -1, label.numpy()).astype("int64") + 1
        predict = pred.numpy().astype("int64") + 1
        labelled += np.sum(target > 0)
        correct += np.sum((predict == target) * (target > 0))
        predict = predict * (target > 0).astype(predict.dtype)
        intersection = predict * (predict == target)
        area_inter, _ = np.histogram(intersection, bins=k, range=(1, k))
        area_pred, _ = np.histogram(predict, bins=k, range=(1, k))
        area_lab, _ = np.histogram(target, bins=k, range=(1, k))
        inter_total += area_inter
        union_total += area_pred + area_lab - area_inter
    iou = 1.0 * inter_total / (np.spacing(1) + union_total)
    return {"pixAcc": 1.0 * correct / (np.spacing(1) + labelled), "IoU": iou, "mIoU": iou.mean()}


@pytest.mark.parametrize("k", [3, 7, 19])
def test_both_conventions_equal_their_transcriptions(k):
    rng = np.random.default_rng(k)
    cm = ConfusionMatrix(k)
    preds, labels = [], []
    for shape in [(11, 13), (7, 5), (16, 9)]:
        # classes 1 and k-1 never appear in the targets; class 1 is never predicted either
        label = rng.choice([c for c in range(k) if c not in (1, k - 1)], size=shape)
        label[rng.random(shape) < 0.15] = 255
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, k, size=shape))
        pred[pred == 1] = 0
        pred[pred == 255] = 0
        preds.append(torch.from_numpy(pred))
        labels.append(torch.from_numpy(label))
        cm.update(preds[-1], labels[-1])
    mmseg, release = _mmseg_metrics(preds, labels, k, 255), _release_metrics(preds, labels, k, 255)
    got, got_release = cm.compute(), cm.compute_release()
    for key in ("aAcc", "mIoU", "mAcc"):
        assert got[key] == pytest.approx(mmseg[key], rel=1e-12)
    np.testing.assert_allclose(got["IoU"], mmseg["IoU"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["Acc"], mmseg["Acc"], rtol=1e-12, equal_nan=True)
    assert got["pixAcc"] == got["aAcc"]
    assert got_release["pixAcc"] == pytest.approx(release["pixAcc"], rel=1e-12)
    assert got_release["mIoU"] == pytest.approx(release["mIoU"], rel=1e-12)
    np.testing.assert_allclose(got_release["IoU"], release["IoU"], rtol=1e-12)
    # the conventions differ exactly where the issue says: class 1 (absent from both) is NaN in
    # one and 0 in the other; class k-1 (predicted, never present) is IoU 0 in both, Acc NaN
    assert math.isnan(got["IoU"][1]) and got_release["IoU"][1] == 0.0
    if k > 3:
        assert got["IoU"][k - 1] == 0.0 and math.isnan(got["Acc"][k - 1])
    assert got_release["mIoU"] < got["mIoU"]


def test_absent_classes_hand_computed():
    # 4 classes; class 3 absent from both. IoU: 0 -> 1/2 (one missed), 1 -> 1/2 (one false), 2 -> 1
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 0, 2]))
    assert cm.compute()["mIoU"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)  # 0.6667: absent left out
    assert cm.compute_release()["mIoU"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 4)  # 0.5: absent as 0
    assert cm.compute()["mAcc"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert cm.compute()["Acc"][3] != cm.compute()["Acc"][3]  # NaN
