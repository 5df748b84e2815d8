"""danet_kernels.convert on the original release's DANet: a ResNet backbone with the release's head
and its bmm PAM_Module / CAM_Module (``attention="reference"``), converted in one call."""

from __future__ import annotations

import copy

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import danet_kernels
from danet.evaluation.cost import LiveTensorBytes
from danet.models import DANet
from danet.models.head import DANetHead
from danet_kernels.convert import FusedChannelAttention, FusedPositionAttention


def _release_danet() -> DANet:
    model = DANet(4, backbone="resnet_tiny", attention="reference", aux=True)
    with torch.no_grad():  # gamma starts at zero, which would hide the attention from every comparison
        model.head.sa.gamma.fill_(0.7)
        model.head.sc.gamma.fill_(-0.6)
    return model


def _step(model: DANet, x: torch.Tensor) -> list[torch.Tensor]:
    """Every training output and every gradient of one forward+backward (dropout seeded)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(1)
    outputs = model(x)
    sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return [o.detach() for o in outputs] + [x.grad, *grads]


def _max_rel_err(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Outputs and input gradient each against its own scale; parameter gradients against the
    largest one (a softmax-shifting bias, key_conv.bias, has a true gradient of exactly 0)."""
    floor = max(e.abs().max().item() for e in expected[5:])
    errors = [(g.double() - e.double()).abs().max().item() / max(e.double().abs().max().item(),
                                                               floor if i >= 5 else 0.0)
              for i, (g, e) in enumerate(zip(got, expected, strict=True))]
    return max(errors)


def test_the_release_danet_converted_keeps_its_state_dict_outputs_and_gradients():
    model = _release_danet().double()
    original = copy.deepcopy(model)
    state = model.state_dict()

    report = danet_kernels.convert(model)

    assert [(s.path, s.kind) for s in report.swapped] == [("head.sa", "position attention"),
                                                         ("head.sc", "channel attention")]
    assert report.skipped == []
    assert isinstance(model.head.sa, FusedPositionAttention)
    assert isinstance(model.head.sc, FusedChannelAttention)
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(after[k].data_ptr() == v.data_ptr() and torch.equal(after[k], v) for k, v in state.items())
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    assert _max_rel_err(_step(model, x), _step(original, x)) <= 1e-12
    model.eval(), original.eval()
    with torch.no_grad():
        got, expected = model(x, head_outputs=True), original(x, head_outputs=True)
    assert max((g - e).abs().max() / e.abs().max() for g, e in zip(got, expected, strict=True)) <= 1e-12


def test_the_release_danet_converted_in_fp32_is_within_the_kernels_error():
    model = _release_danet()
    original = copy.deepcopy(model)
    danet_kernels.convert(model)
    x = torch.randn(2, 3, 40, 56)
    assert _max_rel_err(_step(model, x), _step(original, x)) <= 1e-5


def _peak_growth(head: DANetHead, x: torch.Tensor) -> float:
    """Largest total size of the tensors a forward+backward of ``head`` creates (fake tensors: the
    sizes of the real step, no compute)."""
    with FakeTensorMode(allow_non_fake_inputs=True), LiveTensorBytes() as live:
        outputs = head(torch.empty_like(x))
        sum(o.sum() for o in outputs).backward()
        del outputs
    return live.peak


def test_the_converted_head_grows_memory_less_than_half_as_much_at_97x97():
    """The issue's target: DANet's head at a 97 x 97 feature map, C = 512, fp32, forward+backward,
    followed op by op on fake tensors (measured on real ones in README's "accelerate your model")."""
    x = torch.empty(1, 2048, 97, 97)
    head = DANetHead(2048, 19, attention="reference")
    unconverted = _peak_growth(head, x)
    danet_kernels.convert(head)
    converted = _peak_growth(head, x)
    assert converted < 0.5 * unconverted, (converted / 2**20, unconverted / 2**20)
