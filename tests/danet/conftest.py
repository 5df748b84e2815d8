"""danet tests run the model with the blockwise PyTorch backend.

The root conftest sets TRITON_INTERPRET=1 on machines without a GPU, which would make
backend="auto" run the Triton kernels through the (slow) interpreter inside every model
test. The kernels have their own interpreter tests in tests/danet_kernels; here the model,
data and trainer are under test, so the switch is set to the blockwise backend.
"""

import pytest
import torch

import danet_kernels


@pytest.fixture(autouse=True)
def _blockwise_attention_on_cpu():
    if torch.cuda.is_available():
        yield
        return
    with danet_kernels.use_backend("torch"):
        yield


# ---------------------------------------------------------------- file-system faults


def _mount_tmpfs(path, options: str) -> bool:
    """Mount a tmpfs at ``path`` (root only; False where mounting is not allowed, as in most CI)."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _unmount(path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nobody can write into: chmod 0555 as a user, a read-only tmpfs as root."""
    import os

    path = tmp_path / "readonly"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if not _mount_tmpfs(path, "ro,size=1m"):
        pytest.skip("running as root, and a read-only tmpfs cannot be mounted here")
    try:
        yield path
    finally:
        _unmount(path)


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB file system (a tmpfs; root only, skipped elsewhere): room for one tiny checkpoint."""
    import os

    path = tmp_path / "small_disk"
    if os.geteuid() != 0 or not _mount_tmpfs(path, "size=5m"):
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    try:
        yield path
    finally:
        _unmount(path)
