"""The public functions: input validation (before any backend runs) and backend dispatch."""

from __future__ import annotations

import pytest
import torch

import danet_kernels
from danet_kernels import _dispatch, blockwise, reference
from danet_kernels.functional import channel_attention, position_attention

TOGETHER = r"gamma and residual must be given together"


def _pam(b=2, d=4, c=6, n=10, dtype=torch.float32):
    return tuple(torch.randn(b, ch, n, dtype=dtype) for ch in (d, d, c))


@pytest.fixture
def no_backend_runs(monkeypatch):
    """Every backend entry point fails the test if reached: errors must come before any launch."""

    def reached(*args, **kwargs):
        raise AssertionError("a backend ran on input that should have been rejected")

    for name in ("position_attention_blockwise", "channel_attention_blockwise"):
        monkeypatch.setattr(blockwise, name, reached)
    for name in ("position_attention_reference", "channel_attention_reference"):
        monkeypatch.setattr(reference, name, reached)


@pytest.fixture
def cpu_without_interpreter(monkeypatch):
    """A CPU machine as users have it: Triton's interpreter off."""
    monkeypatch.setattr(_dispatch, "triton_interpreting", lambda: False)


# ---------------------------------------------------------------- validation


def _bad_pam_cases():
    q, k, v = _pam()
    meta = torch.empty(2, 4, 10, device="meta")
    return [
        ("rank", (q[0], k, v), {}, ValueError, r"q must have shape \(B, channels, N\)"),
        ("rank4", (q, k, v.unsqueeze(0)), {}, ValueError, r"v must have shape \(B, channels, N\)"),
        ("batch", (q, k, torch.randn(3, 6, 10)), {}, ValueError, r"v must have shape \(B, C, M\) with k's B"),
        ("m_v", (q, k, torch.randn(2, 6, 11)), {}, ValueError,
         r"k's B and M; got k \(2, 4, 10\), v \(2, 6, 11\)"),
        ("m_k", (q, torch.randn(2, 4, 11), v), {}, ValueError,
         r"v must have shape \(B, C, M\) with k's B and M"),
        ("batch_qk", (q[:1], k, v), {}, ValueError, r"q \(B, d, N\) and k \(B, d, M\) must share B and d"),
        ("d_qk", (q, torch.randn(2, 5, 10), v), {}, ValueError, r"must share B and d; got \(2, 4, 10\) and"),
        ("dtype", (q, k.double(), v), {}, ValueError, r"share one dtype.*k=torch.float64"),
        ("device", (q, meta, v), {}, ValueError, r"share one device.*k=meta"),
        ("int", (q, k, v.long()), {}, TypeError, r"v has dtype torch.int64"),
        ("bool", (q.bool(), k, v), {}, TypeError, r"q has dtype torch.bool"),
        ("not_tensor", (q.tolist(), k, v), {}, TypeError, r"q must be a torch.Tensor, got list"),
        ("empty_d", (q[:, :0], k[:, :0], v), {}, ValueError, r"d is 0"),
        ("empty_c", (q, k, v[:, :0]), {}, ValueError, r"C is 0"),
        ("empty_n", (q[..., :0], k, v), {}, ValueError, r"N is 0"),
        ("empty_m", (q, k[..., :0], v[..., :0]), {}, ValueError, r"M is 0"),
        ("scale_str", (q, k, v), {"scale": "0.5"}, TypeError,
         r"scale must be a Python float or None, got str"),
        ("scale_tensor", (q, k, v), {"scale": torch.tensor(0.5)}, TypeError, r"scale must be .* got Tensor"),
        ("scale_bool", (q, k, v), {"scale": True}, TypeError, r"scale must be .* got bool"),
        ("scale_nan", (q, k, v), {"scale": float("nan")}, ValueError,
         r"scale must be a positive finite float.*nan"),
        ("scale_inf", (q, k, v), {"scale": float("inf")}, ValueError, r"scale must be a positive finite"),
        ("scale_zero", (q, k, v), {"scale": 0.0}, ValueError, r"scale must be a positive finite float.*0\.0"),
        ("scale_negative", (q, k, v), {"scale": -0.125}, ValueError, r"scale must be a positive finite"),
        ("gamma_alone", (q, k, v), {"gamma": torch.ones(1)}, ValueError, TOGETHER),
        ("residual_alone", (q, k, v), {"residual": v}, ValueError, TOGETHER),
        ("gamma_size", (q, k, v), {"gamma": torch.ones(2), "residual": v}, ValueError, r"hold one element"),
        ("gamma_int", (q, k, v), {"gamma": torch.ones(1, dtype=torch.int32), "residual": v}, TypeError,
         r"gamma has dtype torch.int32"),
        ("gamma_device", (q, k, v), {"gamma": torch.ones(1, device="meta"), "residual": v}, ValueError,
         r"gamma is on meta"),
        ("residual_shape", (q, k, v), {"gamma": torch.ones(1), "residual": v[:, :3]}, ValueError,
         r"residual must have shape \(B, C, N\) = \(2, 6, 10\)"),
        ("residual_keys", (q, k[..., :7], v[..., :7]), {"gamma": torch.ones(1), "residual": v[..., :7]},
         ValueError, r"residual must have shape \(B, C, N\) = \(2, 6, 10\) .* got \(2, 6, 7\)"),
        ("residual_dtype", (q, k, v), {"gamma": torch.ones(1), "residual": v.double()}, ValueError,
         r"residual must have shape .* v's dtype"),
        ("unknown_backend", (q, k, v), {"backend": "cuda"}, ValueError, r"unknown backend 'cuda'"),
        ("triton_float64", (q.double(), k.double(), v.double()), {"backend": "triton"}, RuntimeError,
         r"backend='triton' cannot run a torch.float64 tensor"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "error", "message"),
                         [case[1:] for case in _bad_pam_cases()], ids=[case[0] for case in _bad_pam_cases()])
def test_position_attention_rejects_bad_input(args, kwargs, error, message, no_backend_runs):
    with pytest.raises(error, match=message):
        position_attention(*args, **kwargs)


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "message"),
    [
        (torch.randn(6, 10), {}, ValueError, r"x must have shape \(B, channels, N\)"),
        (torch.randn(1, 2, 6, 10), {}, ValueError, r"x must have shape"),
        (torch.ones(2, 6, 10, dtype=torch.int32), {}, TypeError, r"x has dtype torch.int32"),
        (torch.randn(2, 0, 10), {}, ValueError, r"C is 0"),
        (torch.randn(2, 6, 0), {}, ValueError, r"N is 0"),
        (torch.randn(2, 6, 10), {"gamma": torch.ones(3)}, ValueError, r"gamma must hold one element"),
        (torch.randn(2, 6, 10), {"gamma": 0.5}, TypeError, r"gamma must be a torch.Tensor or None, got"),
        (torch.randn(2, 6, 10), {"backend": "fast"}, ValueError, r"unknown backend 'fast'"),
        (torch.randn(2, 6, 10, dtype=torch.float64), {"backend": "triton"}, RuntimeError,
         r"cannot run a torch.float64 tensor on cpu"),
    ],
    ids=["rank2", "rank4", "int", "empty_c", "empty_n", "gamma_size", "gamma_float", "unknown_backend",
         "triton_float64"],
)
def test_channel_attention_rejects_bad_input(x, kwargs, error, message, no_backend_runs):
    with pytest.raises(error, match=message):
        channel_attention(x, **kwargs)


def test_triton_forced_on_cpu_without_interpreter_is_refused(cpu_without_interpreter):
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        position_attention(*_pam(), backend="triton")


def test_empty_batch_returns_empty_output():
    q, k, v = _pam(b=0)
    assert position_attention(q, k, v, backend="torch").shape == (0, 6, 10)
    assert channel_attention(torch.randn(0, 6, 10), gamma=torch.ones(1)).shape == (0, 6, 10)


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_auto_picks_blockwise_on_cpu_without_interpreter(dtype, cpu_without_interpreter):
    assert _dispatch.resolve_backend("auto", torch.ones(1, dtype=dtype)) == "torch"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_auto_picks_triton_under_interpreter(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not _dispatch.triton_importable():
        pytest.skip("triton is not installed")
    assert _dispatch.resolve_backend("auto", torch.ones(1, dtype=dtype)) == "triton"
    assert _dispatch.resolve_backend("auto", torch.ones(1, dtype=torch.float64)) == "torch"


def test_bf16_under_interpreter_goes_to_blockwise_and_forcing_triton_says_why(monkeypatch):
    """The interpreter's bf16 dots are wrong: auto must not send bf16 there, triton must refuse."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not _dispatch.triton_importable():
        pytest.skip("triton is not installed")
    x = torch.ones(1, dtype=torch.bfloat16)
    assert _dispatch.resolve_backend("auto", x) == "torch"
    with pytest.raises(RuntimeError, match=r"interpreter .*bf16 dots wrongly"):
        _dispatch.resolve_backend("triton", x)
    # end to end through the public functions: the blockwise result, close to float64
    q, k, v = (t.bfloat16() for t in _pam())
    out = position_attention(q, k, v)
    expected = reference.position_attention_reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)
    with pytest.raises(RuntimeError, match="bf16"):
        channel_attention(torch.randn(1, 4, 8).bfloat16(), backend="triton")


def test_environment_interpreter_flag_is_read(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _dispatch.triton_interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.triton_interpreting()


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_functional_routes_to_the_resolved_backend(monkeypatch, cpu_without_interpreter):
    """auto -> blockwise on a CPU; the default set by use_backend; an explicit backend= wins."""
    calls: list[str] = []
    _spy(monkeypatch, blockwise, "position_attention_blockwise", calls)
    _spy(monkeypatch, blockwise, "channel_attention_blockwise", calls)
    _spy(monkeypatch, reference, "position_attention_reference", calls)
    _spy(monkeypatch, reference, "channel_attention_reference", calls)
    q, k, v = _pam()
    x = torch.randn(2, 6, 10)

    position_attention(q, k, v)
    channel_attention(x)
    assert calls == ["position_attention_blockwise", "channel_attention_blockwise"]
    calls.clear()
    with danet_kernels.use_backend("reference"):
        position_attention(q, k, v)
        channel_attention(x)
        position_attention(q, k, v, backend="torch")
    assert calls == [
        "position_attention_reference",
        "channel_attention_reference",
        "position_attention_blockwise",
    ]


def test_functional_routes_to_triton_under_interpreter(monkeypatch):
    if not _dispatch.triton_importable():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from danet_kernels.kernels import channel_attention as cam_kernels
    from danet_kernels.kernels import position_attention as pam_kernels

    calls = []
    monkeypatch.setattr(pam_kernels, "position_attention_triton", lambda *a: calls.append("pam") or a[2])
    monkeypatch.setattr(cam_kernels, "channel_attention_triton", lambda *a: calls.append("cam") or a[0])
    position_attention(*_pam())
    channel_attention(torch.randn(2, 6, 10))
    position_attention(*_pam(dtype=torch.float64))  # float64: Triton cannot, blockwise runs
    assert calls == ["pam", "cam"]


def test_backends_agree():
    q, k, v = _pam(n=23)
    gamma, residual = torch.tensor([0.3]), torch.randn(v.shape)
    pam = [position_attention(q, k, v, gamma=gamma, residual=residual, backend=b)
           for b in ("torch", "reference")]
    torch.testing.assert_close(pam[0], pam[1])
    # a non-local block's call: keys and values pooled to M = 6 of N = 23, softmax scale d^-1/2
    pooled = [position_attention(q, k[..., :6], v[..., :6], scale=0.5, backend=b)
              for b in ("torch", "reference")]
    torch.testing.assert_close(pooled[0], pooled[1])
    assert pooled[0].shape == (2, 6, 23)


def test_scale_none_is_one_and_scale_is_applied():
    """scale=None is DANet's 1; a scale multiplies the energies (the oracle's own definition)."""
    q, k, v = (t.double() for t in _pam(n=9))
    plain = position_attention(q, k, v, backend="reference")
    assert torch.equal(position_attention(q, k, v, scale=1.0, backend="reference"), plain)
    assert torch.equal(position_attention(q, k, v, scale=None, backend="reference"), plain)
    expected = v @ torch.softmax(0.25 * q.mT @ k, dim=-1).mT
    torch.testing.assert_close(position_attention(q, k, v, scale=0.25, backend="reference"), expected)
    torch.testing.assert_close(position_attention(q, k, v, scale=0.25, backend="torch"), expected)
    x = torch.randn(2, 6, 23)
    cam = [channel_attention(x, backend=b) for b in ("torch", "reference")]
    torch.testing.assert_close(cam[0], cam[1])


def test_set_backend_and_use_backend_restore():
    assert danet_kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'"):
        danet_kernels.set_backend("gpu")
    assert danet_kernels.get_backend() == "auto"
    with danet_kernels.use_backend("torch"):
        assert danet_kernels.get_backend() == "torch"
        with danet_kernels.use_backend("reference"):
            assert danet_kernels.get_backend() == "reference"
        assert danet_kernels.get_backend() == "torch"
    assert danet_kernels.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="inside"), danet_kernels.use_backend("reference"):
        raise RuntimeError("inside")
    assert danet_kernels.get_backend() == "auto"
    try:
        danet_kernels.set_backend("torch")
        assert _dispatch.resolve_backend("auto", torch.ones(1)) == "torch"
    finally:
        danet_kernels.set_backend("auto")
