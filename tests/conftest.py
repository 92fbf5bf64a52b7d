"""Shared fixtures: paths to the shipped sample and to the real shared data (when present)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SAMPLE_COCO = SAMPLE / "coco" / "annotations.json"
SAMPLE_YOLO = SAMPLE / "yolo" / "data.yaml"
# ../shared/data beside the checkout (DESIGN "Data for tests"); absent on a fresh machine.
SHARED = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real shared data not present: {path}")
    return path


@pytest.fixture(scope="session")
def sample_coco_bank(tmp_path_factory):
    """A memmap bank built once from the shipped COCO sample (S=64)."""
    from instbank.build import BuildConfig, build_bank
    from instbank.formats.coco import read_coco
    from instbank.storage import open_bank

    out = tmp_path_factory.mktemp("banks") / "sample-coco"
    build_bank(read_coco(SAMPLE_COCO), out, BuildConfig(size=64), workers=1)
    return open_bank(out)
