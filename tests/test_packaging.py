"""Packaging a user can trust: the metadata, the files that ship, and hints that name the extras."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from danet import runtime

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_metadata_license_build_backend_and_extras():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    (backend,) = PYPROJECT["build-system"]["requires"]
    assert backend.startswith("setuptools>=") and ",<" in backend  # an upper bound
    assert {"export", "test", "tensorboard"} <= set(project["optional-dependencies"])
    assert project["name"] == runtime.DISTRIBUTION


def test_citation_cites_the_paper_and_the_package():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert citation["version"] == PYPROJECT["project"]["version"] and citation["license"] == "MIT"
    paper = citation["preferred-citation"]
    assert paper["title"] == "Dual Attention Network for Scene Segmentation" and paper["year"] == 2019
    assert [a["family-names"] for a in paper["authors"]][:2] == ["Fu", "Liu"]
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


def test_both_packages_are_typed():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    for package in ("danet", "danet_kernels"):
        assert (ROOT / package / "py.typed").is_file()
        assert "py.typed" in data[package]


def test_install_hint_names_the_checkout_or_the_installed_extra(monkeypatch: pytest.MonkeyPatch):
    assert runtime.install_hint("export") == f"pip install -c constraints.txt -e '.[export]' (in {ROOT})"
    monkeypatch.setattr(runtime, "_checkout_root", lambda: None)
    monkeypatch.setattr(runtime.importlib.metadata, "version", lambda name: "0.1.0")
    assert runtime.install_hint("export") == "pip install 'danet-fused[export]==0.1.0'"


def test_the_wheel_ships_licence_types_and_metadata(tmp_path: Path):
    """setuptools (as installed, no build isolation: no network) builds a wheel of a copy of the
    sources; the wheel holds both packages' py.typed, the licence and the SPDX metadata."""
    source = tmp_path / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for package in ("danet", "danet_kernels"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    build = "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"
    done = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = source / "dist" / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    assert {"danet/py.typed", "danet_kernels/py.typed", "danet/configs/cityscapes.yaml"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in text and "Provides-Extra: export" in text
    assert "Requires-Dist: huggingface_hub" in text
