"""danet export: ONNX run in onnxruntime on the CPU, and torch.export programs, against the PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from danet.cli import main
from danet.data import SyntheticShapes
from danet.models import load_model
from danet.models.export import METADATA_FILE
from tests.danet.training_helpers import save_checkpoint, tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("export") / "tiny.pt", tiny_model(), crop_size=48)


def _pytorch_logits(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        return model.eval()(images)


def test_onnx_export_runs_in_onnxruntime(checkpoint: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "danet.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "checked: onnxruntime differs from PyTorch by at most" in printed
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    # what a deployment needs beside the graph: the classes, the normalisation, the layouts
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["danet:classes"]) == list(SyntheticShapes.CLASS_NAMES)
    assert json.loads(metadata["danet:palette"]) == SyntheticShapes.PALETTE.tolist()
    assert json.loads(metadata["danet:mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(metadata["danet:std"]) == [0.229, 0.224, 0.225]
    assert metadata["danet:dataset"] == "synthetic" and "NCHW" in metadata["danet:input"]
    # other sizes than the example's, and a batch of two: the exported graph is not one constant
    for shape in [(1, 3, 48, 48), (2, 3, 40, 72)]:
        images = torch.randn(shape)
        (logits,) = session.run(None, {"images": images.numpy()})
        expected = _pytorch_logits(checkpoint, images).numpy()
        assert logits.shape == expected.shape
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(out)]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err


def test_torch_export_program_loads_and_matches(checkpoint: Path, tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "danet.pt2"
    args = ["export", "--checkpoint", str(checkpoint), "--format", "torch-export", "--output", str(out),
            "--device", "cpu"]
    assert main(args) == 0
    printed = capfd.readouterr()  # torch's own log goes to the process's stderr
    assert "checked: the loaded program differs" in printed.out
    assert ".pt2" not in printed.err  # torch's warning about the temporary's name, written atomically
    extra_files = {METADATA_FILE: ""}
    torch.export.load(str(out), extra_files=extra_files)
    metadata = json.loads(extra_files[METADATA_FILE])
    assert json.loads(metadata["danet:classes"]) == list(SyntheticShapes.CLASS_NAMES)
    program = torch.export.load(str(out)).module()
    images = torch.randn(2, 3, 56, 40)
    torch.testing.assert_close(program(images), _pytorch_logits(checkpoint, images), rtol=1e-5, atol=1e-5)
    targets = {str(n.target) for n in torch.export.load(str(out)).graph.nodes if n.op == "call_function"}
    assert not any("danet_kernels" in t or ".out" in t for t in targets)  # plain ops only


def test_fixed_size_export_and_bad_requests(checkpoint: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fixed.pt2"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torch-export", "--output", str(out),
                 "--size", "40", "56", "--fixed-size"]) == 0
    assert "input 1x3x40x56 only" in capsys.readouterr().out
    program = torch.export.load(str(out)).module()
    with pytest.raises(Exception, match=r"40|56"):  # torch refuses another size: guards on the shape
        program(torch.randn(1, 3, 48, 48))
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torch-export", "--output",
                 str(tmp_path / "small.pt2"), "--size", "16", "16"]) == 2
    assert "--size must be at least 32 pixels" in capsys.readouterr().err
    (tmp_path / "adir.onnx").mkdir()
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "adir.onnx")]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                            "ignore::torch.jit.TracerWarning")
def test_legacy_onnx_export_of_the_cpu_model_is_not_a_constant(checkpoint: Path, tmp_path: Path) -> None:
    """torch.onnx.export(dynamo=False) on the CPU default (blockwise backend) used to export a graph
    without inputs that returned a constant; it now traces the plain attention ops."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import danet_kernels

    model, _ = load_model(checkpoint)
    model.eval()
    example = torch.randn(1, 3, 48, 48)
    path = tmp_path / "legacy.onnx"
    with danet_kernels.use_backend("torch"), torch.no_grad():
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["images"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    other = torch.randn(1, 3, 48, 48)  # the size it was traced at, other values
    (logits,) = session.run(None, {"images": other.numpy()})
    expected = _pytorch_logits(checkpoint, other).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
