"""danet_kernels.convert: which modules it swaps, which it leaves, and that the swap changes nothing
but the memory (state_dict, outputs, gradients, optimizers, hooks, devices, DDP, autocast, compile)."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
from torch import nn

import danet_kernels
from danet_kernels import _dispatch
from danet_kernels.convert import FusedChannelAttention, FusedPositionAttention, convert
from tests.conftest import requires_cuda
from tests.danet_kernels import attention_zoo as zoo

C = 16  # channels of the test modules: PAM's query/key width is C // 8 = 2


class Pair(nn.Module):
    """A model holding a position and a channel attention module, as DANet's head does."""

    def __init__(self, pam: nn.Module, cam: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.pam = pam
        self.cam = cam

    def forward(self, x):
        y = self.stem(x)
        return self.pam(y) + self.cam(y)


def _activated(model: nn.Module) -> nn.Module:
    """Non-zero gammas (they start at zero, which would hide the attention from every comparison)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "gamma.scale")):
                p.fill_(0.7 if "pam" in name else -0.6)
    return model


def _rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """Largest error relative to the expected tensor's largest magnitude (or ``floor``, if larger)."""
    scale = max(expected.double().abs().max().item(), floor)
    return (actual.double() - expected.double()).abs().max().item() / scale


def _assert_close(got: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> None:
    """Output, input gradient, then parameter gradients: each relative to its own scale, the
    parameter gradients to the largest one's (key_conv.bias's true gradient is exactly 0: it
    shifts a whole softmax row)."""
    floor = max(e.abs().max().item() for e in expected[2:])
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert _rel_err(g, e, floor if index >= 2 else 0.0) <= tolerance, index


def _outputs_and_grads(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return [out.detach(), x.grad, *grads]


@pytest.fixture(autouse=True)
def _blockwise():
    """The blockwise backend, as a CPU user gets it (the Triton kernels run in their own tests)."""
    with danet_kernels.use_backend("torch"):
        yield


# ---------------------------------------------------------------------------- the swaps


@pytest.mark.parametrize(("pam_cls", "cam_cls"), [
    (lambda: zoo.ReleasePAM(C), lambda: zoo.ReleaseCAM(C)),
    (lambda: danet_kernels.reference.PAM_Module(C), lambda: danet_kernels.reference.CAM_Module(C)),
    (lambda: zoo.MmsegPAM(C, C // 8), zoo.MmsegCAM),
], ids=["release", "reference", "mmseg"])
def test_swaps_share_parameters_and_keep_state_dict_outputs_and_gradients(pam_cls, cam_cls):
    model = _activated(Pair(pam_cls(), cam_cls())).double()
    original = copy.deepcopy(model)
    parameters = dict(model.named_parameters())
    state = model.state_dict()

    report = convert(model)

    assert report.model is model
    assert [(s.path, s.kind) for s in report.swapped] == [("pam", "position attention"),
                                                         ("cam", "channel attention")]
    assert report.skipped == []
    assert isinstance(model.pam, FusedPositionAttention) and isinstance(model.cam, FusedChannelAttention)
    after = dict(model.named_parameters())
    assert list(after) == list(parameters) and all(after[n] is p for n, p in parameters.items())
    new_state = model.state_dict()
    assert list(new_state) == list(state)
    assert all(new_state[k].data_ptr() == v.data_ptr() for k, v in state.items())
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    grad = torch.randn(2, C, 7, 5, dtype=torch.float64)
    _assert_close(_outputs_and_grads(model, x, grad), _outputs_and_grads(original, x, grad), 1e-12)


def test_fp32_within_the_kernels_error_of_float64():
    model = _activated(Pair(zoo.ReleasePAM(C), zoo.ReleaseCAM(C)))
    exact = copy.deepcopy(model).double()
    convert(model)
    x = 0.5 * torch.randn(2, 3, 9, 7)
    grad = torch.randn(2, C, 9, 7)
    _assert_close(_outputs_and_grads(model, x, grad), _outputs_and_grads(exact, x.double(), grad.double()),
                  1e-5)


def test_sagan_blocks():
    """The copy that returns out is swapped; Self_Attn, which returns its attention map too, only
    with drop_attention_maps=True, and then returns (out, None)."""
    model = nn.ModuleDict({"copy": zoo.SelfAttention(C), "sagan": zoo.SelfAttn(C)})
    _activated(model)
    report = convert(model)
    assert [s.path for s in report.swapped] == ["copy"]
    assert isinstance(model["copy"], FusedPositionAttention)
    (skipped,) = report.skipped
    assert skipped.path == "sagan" and "drop_attention_maps=True" in skipped.reason
    assert isinstance(model["sagan"], zoo.SelfAttn)

    original = copy.deepcopy(model["sagan"])
    report = convert(model, drop_attention_maps=True)
    assert [s.path for s in report.swapped] == ["sagan"]
    x = torch.randn(2, C, 6, 6)
    out, attention = model["sagan"](x)
    assert attention is None
    torch.testing.assert_close(out, original(x)[0])


class Unnamed(nn.Module):
    """The release's PAM with its projections named a (key), b (value), c (query)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(C, 2, 1), nn.Conv2d(C, C, 1), nn.Conv2d(C, 2, 1)
        self.gamma = nn.Parameter(torch.tensor([0.7]))

    def forward(self, x):
        b, c, h, w = x.shape
        energy = torch.bmm(self.c(x).flatten(2).transpose(1, 2), self.a(x).flatten(2))
        out = torch.bmm(self.b(x).flatten(2), energy.softmax(-1).transpose(1, 2))
        return self.gamma * out.view(b, c, h, w) + x


def test_roles_without_telling_names_are_found_by_computation():
    """The shapes pick the value; verification tells the query from the key."""
    report = convert(nn.Sequential(Unnamed()), verify=False)
    assert report.swapped == [] and "verify=True tells them apart" in report.skipped[0].reason
    model = nn.Sequential(Unnamed())
    original = copy.deepcopy(model)
    (swap,) = convert(model).swapped
    assert "query=c, key=a, value=b" in swap.detail
    x = torch.randn(2, C, 5, 4)
    torch.testing.assert_close(model(x), original(x))


def _output_projection_nonzero(model: nn.Module) -> nn.Module:
    """Non-local blocks zero-initialise their output projection, which would hide the attention."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in ("conv_out", "W"):
                for p in module.parameters():
                    p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("use_scale", [True, False])
def test_mmcv_nonlocal2d(use_scale, sub_sample):
    """Embedded Gaussian, with and without the 1/sqrt(d) scale, with and without pooled keys."""
    model = _output_projection_nonzero(nn.Sequential(zoo.NonLocal2d(C, use_scale=use_scale,
                                                                    sub_sample=sub_sample))).double()
    original = copy.deepcopy(model)
    (swap,) = convert(model).swapped
    assert swap.kind == "non-local attention"
    assert ("scale=0.353553" in swap.detail) == use_scale  # 1 / sqrt(C / 2)
    x = torch.randn(2, C, 6, 7, dtype=torch.float64)  # 7: a pooled width that rounds down
    grad = torch.randn(2, C, 6, 7, dtype=torch.float64)
    _assert_close(_outputs_and_grads(model, x, grad), _outputs_and_grads(original, x, grad), 1e-12)


def test_mmseg_self_attention_with_matmul_norm():
    """A SelfAttentionBlock with matmul_norm (softmax of q^T k / sqrt(channels)) gets that scale."""
    model = _activated(nn.Sequential(zoo.MmsegPAM(C, 4, matmul_norm=True))).double()
    original = copy.deepcopy(model)
    (swap,) = convert(model).swapped
    assert "scale=0.5" in swap.detail
    x = torch.randn(2, C, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x))


def test_nonlocal_with_a_norm_after_its_output_projection_and_the_older_layout():
    """mmcv's norm_cfg (a BatchNorm after conv_out, trained and evaluated), and the layout whose
    output projection is W and whose missing scale only verification can tell."""
    model = nn.ModuleDict({"mmcv": zoo.NonLocal2d(C, norm=True), "older": zoo.NonLocalBlock(C, 4)})
    _output_projection_nonzero(model)
    original = copy.deepcopy(model)
    report = convert(model)
    assert [s.path for s in report.swapped] == ["mmcv", "older"]
    assert "output=W" in report.swapped[1].detail and "scale" not in report.swapped[1].detail
    x = torch.randn(2, C, 5, 6)
    for mode in (True, False):
        model.train(mode), original.train(mode)
        for name in ("mmcv", "older"):
            torch.testing.assert_close(model[name](x), original[name](x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- what is left alone


LOOK_ALIKES = {
    "softmax over the queries": (lambda: zoo.SoftmaxOverQueries(C), "differs"),
    "softmax child over dim 1": (lambda: zoo.SoftmaxChildOverQueries(C), "runs over dim 1"),
    "energy / sqrt(d)": (lambda: zoo.ScaledEnergy(C), "differs"),
    "attention dropout": (lambda: zoo.AttentionDropout(C), "'dropout' (Dropout) is not part"),
    "functional attention dropout": (lambda: zoo.FunctionalAttentionDropout(C), "training mode"),
    "CAM without rowmax - energy": (lambda: zoo.CAMWithoutRowmax(C), "differs"),
    "CAM transposed": (lambda: zoo.CAMTransposed(C), "differs"),
    "CAM on normalised channels": (lambda: zoo.CAMNormalised(C), "differs"),
    "mmcv dot_product non-local": (lambda: zoo.NonLocal2d(C, mode="dot_product"), "not softmax attention"),
}


@pytest.mark.parametrize("name", LOOK_ALIKES)
def test_look_alikes_are_never_swapped(name):
    build, reason = LOOK_ALIKES[name]
    model = nn.Sequential(build())
    module = model[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = convert(model)
    assert report.swapped == []
    (skipped,) = report.skipped
    assert reason in skipped.reason, skipped.reason
    assert model[0] is module
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # verification ran on copies


def test_modules_that_are_not_attention_are_not_reported():
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C), zoo.TemperatureScale())
    report = convert(model)
    assert report.swapped == []
    assert [s.path for s in report.skipped] == ["2"]  # the lone gamma: examined, and it is no CAM
    assert "differs" in report.skipped[0].reason


def test_already_fused_modules_are_left_and_said_so():
    model = nn.Sequential(danet_kernels.PAM_Module(C), danet_kernels.CAM_Module(C))
    report = convert(model)
    assert report.swapped == [] and {s.reason for s in report.skipped} == {"it is fused already"}
    report = convert(Pair(zoo.ReleasePAM(C), zoo.ReleaseCAM(C)))
    again = convert(report.model)
    assert again.swapped == [] and len(again.skipped) == 2


def test_a_forward_with_more_inputs_is_left():
    model = nn.Sequential(zoo.SelfAttentionBlock(C, C, 2, C, False, None, None, 1, 1, False, False, False,
                                                 False, None, None, None))
    model[0].gamma = nn.Parameter(torch.zeros(1))
    report = convert(model)
    assert report.swapped == [] and "forward takes (query_feats, key_feats)" in report.skipped[0].reason


# ---------------------------------------------------------------------------- the walk and the report


def test_a_shared_module_is_replaced_everywhere_by_one_replacement():
    pam = zoo.ReleasePAM(C)
    model = nn.ModuleDict({"first": pam, "second": nn.Sequential(pam)})
    report = convert(model)
    assert len(report.swapped) == 1
    assert model["first"] is model["second"][0]
    assert isinstance(model["first"], FusedPositionAttention)


def test_the_model_itself_can_be_the_attention_module():
    pam = _activated(zoo.ReleasePAM(C))
    report = convert(pam)
    assert isinstance(report.model, FusedPositionAttention) and isinstance(pam, zoo.ReleasePAM)
    assert report.swapped[0].path == "(the model)"
    x = torch.randn(1, C, 4, 5)
    torch.testing.assert_close(report.model(x), pam(x))


def test_report_is_returned_and_logged(caplog):
    model = nn.Sequential(zoo.ReleasePAM(C), zoo.CAMWithoutRowmax(C))
    with caplog.at_level(logging.INFO, logger="danet_kernels.convert"):
        report = convert(model)
    text = str(report)
    assert "1 module(s) swapped, 1 skipped" in text
    assert "swapped 0: ReleasePAM -> fused position attention" in text
    assert "skipped 1: CAMWithoutRowmax: its output differs" in text
    assert any("swapped 0" in r.message for r in caplog.records)
    assert any("skipped 1" in r.message for r in caplog.records)


def test_hooks_attributes_pickling_and_bad_input():
    pam = zoo.ReleasePAM(C)
    seen = []
    handle = pam.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model = nn.Sequential(pam)
    convert(model)
    fused = model[0]
    assert fused.chanel_in == C and isinstance(fused.softmax, nn.Softmax)
    fused(torch.randn(1, C, 3, 3))
    assert seen == [torch.Size([1, C, 3, 3])]
    handle.remove()
    fused(torch.randn(1, C, 3, 3))
    assert len(seen) == 1
    restored = pickle.loads(pickle.dumps(model))
    x = torch.randn(1, C, 3, 4)
    torch.testing.assert_close(restored(x), model(x))
    with pytest.raises(ValueError, match=r"ReleasePAM \(fused by danet_kernels\.convert\) expects \(B, C,"):
        fused(torch.randn(1, C, 9))
    with pytest.raises(TypeError, match=r"convert takes an nn\.Module"):
        convert(pam.state_dict())


def test_verification_leaves_the_random_state_and_the_module_alone():
    """The dropout look-alike draws from the global generator while it is verified (in training
    mode), and the module is run in both modes: the caller sees neither."""
    model = nn.Sequential(zoo.FunctionalAttentionDropout(C).eval(), zoo.ReleasePAM(C))
    state = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = convert(model)
    assert [s.path for s in report.skipped] == ["0"] and [s.path for s in report.swapped] == ["1"]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[0].training is False and model[1].training is True  # their modes are their own


# ---------------------------------------------------------------------------- in training


def test_an_optimizer_built_before_keeps_training_the_converted_model():
    model = _activated(Pair(zoo.ReleasePAM(C), zoo.ReleaseCAM(C)))
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    convert(model)
    for _ in range(2):
        x = torch.randn(2, 3, 6, 5)
        for m, opt in ((model, optimizer), (twin, twin_optimizer)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_to_device_and_dtype_before_and_after_convert():
    before = _activated(Pair(zoo.ReleasePAM(C), zoo.ReleaseCAM(C)))
    after = copy.deepcopy(before)
    reference = copy.deepcopy(before).double()
    convert(before.double())
    convert(after)
    after.double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(before(x), reference(x))
    torch.testing.assert_close(after(x), reference(x))


@requires_cuda
def test_cuda_before_and_after_convert():
    before = _activated(Pair(zoo.ReleasePAM(C), zoo.ReleaseCAM(C)))
    reference = copy.deepcopy(before).cuda()
    after = copy.deepcopy(reference)
    convert(before)
    before.cuda()
    report = convert(after)
    assert len(report.swapped) == 2
    x = torch.randn(2, 3, 9, 7, device="cuda")
    with danet_kernels.use_backend("auto"):
        for model in (before, after):
            torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_ddp_wraps_the_converted_model(tmp_path):
    """A gloo process group of one on the CPU: DDP after convert trains as the model alone does."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                                         world_size=1)
    try:
        model = _activated(Pair(zoo.ReleasePAM(C), zoo.ReleaseCAM(C)))
        convert(model)
        alone = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(2, 3, 6, 5)
        grad = torch.randn(2, C, 6, 5)
        got = _outputs_and_grads(ddp, x, grad)
        for g, e in zip(got, _outputs_and_grads(alone, x, grad), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()


def test_autocast_after_convert():
    """Under CPU autocast (bf16) the converted model is at least as close to fp32 as the original."""
    model = _activated(Pair(zoo.ReleasePAM(C), zoo.ReleaseCAM(C)))
    original = copy.deepcopy(model)
    x = 0.3 * torch.randn(1, 3, 8, 8)
    exact = original(x)
    convert(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        ref_out = original(x)
    assert out.dtype == ref_out.dtype
    assert _rel_err(out, exact) <= max(2 * _rel_err(ref_out, exact), 1e-5)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_convert_under_autocast_verifies_exactly():
    model = nn.Sequential(zoo.ReleasePAM(C))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = convert(model)
    assert "verified in float64" in report.swapped[0].detail


@pytest.mark.slow
def test_compile_fullgraph_of_the_converted_model(monkeypatch):
    """torch.compile(fullgraph=True) with Inductor (C++ on the CPU) of a converted model: no graph
    break, the same outputs and gradients as eager."""
    monkeypatch.setattr(_dispatch, "triton_interpreting", lambda: False)
    torch._dynamo.reset()
    model = _activated(Pair(zoo.MmsegPAM(C, 2), zoo.ReleaseCAM(C)))
    convert(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1, 3, 5, 6)
    grad = torch.randn(1, C, 5, 6)
    for g, e in zip(_outputs_and_grads(compiled, x, grad), _outputs_and_grads(model, x, grad), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_triton_kernels_run_the_converted_modules():
    """One tiny case through the Triton kernels (the interpreter on a CPU, the kernels on a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (_dispatch.triton_importable() and _dispatch.triton_interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 with triton installed")
    model = _activated(Pair(zoo.MmsegPAM(C, 2), zoo.ReleaseCAM(C)))
    model.nonlocal_block = zoo.NonLocal2d(C, sub_sample=True)  # scale 1/sqrt(8), M = N / 4
    _output_projection_nonzero(model).to(device)
    original = copy.deepcopy(model)
    assert len(convert(model).swapped) == 3
    x = torch.randn(1, 3, 4, 5, device=device)
    y = torch.randn(1, C, 4, 5, device=device)
    with danet_kernels.use_backend("triton"):
        out, out_nonlocal = model(x), model.nonlocal_block(y)
    torch.testing.assert_close(out, original(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_nonlocal, original.nonlocal_block(y), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- the real classes


def test_mmsegmentation_dahead_itself():
    """mmseg's own PAM and CAM, when mmsegmentation (and mmcv's compiled ops) can be imported."""
    da_head = pytest.importorskip("mmseg.models.decode_heads.da_head")
    model = _activated(Pair(da_head.PAM(C, C // 8), da_head.CAM())).double()
    original = copy.deepcopy(model)
    report = convert(model)
    assert [s.kind for s in report.swapped] == ["position attention", "channel attention"]
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x))


def test_mmcv_nonlocal2d_itself():
    """mmcv's own NonLocal2d (pooled keys, the scale), when mmcv can be imported."""
    non_local = pytest.importorskip("mmcv.cnn.bricks.non_local")
    model = _output_projection_nonzero(nn.Sequential(non_local.NonLocal2d(C, sub_sample=True))).double()
    original = copy.deepcopy(model)
    assert [s.kind for s in convert(model).swapped] == ["non-local attention"]
    x = torch.randn(2, C, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x))
