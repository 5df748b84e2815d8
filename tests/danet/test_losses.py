"""danet.training.losses.DANetLoss: weighted sum of per-output cross entropies, ignore label honoured."""

import pytest
import torch
from torch.nn import functional

from danet.training.losses import DANetLoss


def _outputs(n, batch=2, classes=5, size=(7, 9), dtype=torch.float64):
    return tuple(torch.randn(batch, classes, *size, dtype=dtype, requires_grad=True) for _ in range(n))


def _target(batch=2, classes=5, size=(7, 9), ignore=255):
    target = torch.randint(0, classes, (batch, *size))
    target[:, 0, :] = ignore  # a row of ignored pixels
    return target


def _manual_ce(logits, target, ignore):
    """Cross entropy written out: mean over the pixels that are not ignored."""
    keep = target != ignore
    logp = torch.log_softmax(logits.double(), dim=1)
    picked = logp.gather(1, target.clamp(0, logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return -(picked[keep]).mean()


@pytest.mark.parametrize("n_outputs", [3, 4])
@pytest.mark.parametrize("ignore", [255, -1])
def test_weighted_sum_of_terms_and_gradients(n_outputs, ignore):
    weights, aux = (1.0, 0.5, 2.0), 0.4
    outputs, target = _outputs(n_outputs), _target(ignore=ignore)
    total, terms = DANetLoss(weights, aux, ignore_index=ignore)(outputs, target)
    expected = sum(w * _manual_ce(o, target, ignore) for w, o in zip((*weights, aux), outputs, strict=False))
    torch.testing.assert_close(total.double(), expected, rtol=1e-6, atol=1e-7)
    assert list(terms) == ["sum", "pam", "cam", "aux"][:n_outputs]
    grads = torch.autograd.grad(total, outputs)
    expected_grads = torch.autograd.grad(expected, outputs)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_ignored_pixels_do_not_matter():
    outputs, target = _outputs(3), _target()
    loss = DANetLoss()
    before, _ = loss(outputs, target)
    changed = tuple(o.detach().clone() for o in outputs)
    for o in changed:
        o[:, :, 0, :] = 1e4 * torch.randn_like(o[:, :, 0, :])  # garbage only where the label is ignored
    after, _ = loss(changed, target)
    torch.testing.assert_close(before, after)


def test_single_tensor_and_low_precision_logits():
    logits = torch.randn(2, 4, 5, 6).bfloat16()
    target = torch.randint(0, 4, (2, 5, 6))
    total, _ = DANetLoss()(logits, target)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, functional.cross_entropy(logits.float(), target))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="expected 3 values"):
        DANetLoss(weights=(1.0, 1.0))
    with pytest.raises(ValueError, match=">= 0"):
        DANetLoss(aux_weight=-1.0)
    with pytest.raises(ValueError, match="target is"):
        DANetLoss()(_outputs(3, size=(4, 4)), _target(size=(5, 4)))
    with pytest.raises(ValueError, match="1 to 4 model outputs"):
        DANetLoss()(_outputs(5), _target())
