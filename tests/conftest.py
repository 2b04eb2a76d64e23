"""Shared fixtures: the real data kept in ../shared/data, extracted once per machine."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("XMODAL_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("XMODAL_TEST_CACHE", Path.home() / ".cache" / "xmodal-test-data"))


def _extracted(archive: str, folder: str) -> Path:
    """Extract ``archive`` from ../shared/data into the cache once; skip when it is absent."""
    tar_path = SHARED_DATA / archive
    target = CACHE / folder
    if target.is_dir() and (target / ".complete").exists():
        return target
    if not tar_path.exists():
        pytest.skip(f"real data {tar_path} is absent (only CI and the team's machines have it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".{folder}.partial-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp, filter="data")
    extracted = tmp / folder
    if not extracted.is_dir():
        raise RuntimeError(f"{tar_path} did not contain a top-level folder {folder!r}")
    (extracted / ".complete").touch()
    try:
        extracted.rename(target)
    except OSError:  # another worker won the race; its copy is complete
        pass
    return target


@pytest.fixture(scope="session")
def cifar10_jpeg() -> Path:
    """Root of the CIFAR-10 JPEG ImageFolder tree (``train/``, ``test/``)."""
    return _extracted("cifar10-jpeg.tar.gz", "cifar10")


@pytest.fixture(scope="session")
def nyuv2_mini() -> Path:
    """Root of the 18 real NYU-Depth-V2 frames (``rgb/``, ``depth/``, ``label13/``, ``meta/``)."""
    return _extracted("nyuv2-mini.tar.gz", "nyuv2-mini")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
