"""Shared fixtures: paths to the shipped sample and to the real shared data (when present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def modules_loaded_by(code: str, modules) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code`` (sorted)."""
    import json
    import subprocess
    import sys

    probe = f"{code}\nimport json, sys; print(json.dumps(sorted(m for m in {tuple(modules)!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def assert_rich_png(path, size=None, min_std=20.0, min_colours=1000) -> np.ndarray:
    """The file is a PNG (of ``size`` when given) with real content, not a blank or flat canvas
    (plots have few colours but strong contrast: pass a lower ``min_colours``)."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == tuple(size)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > min_std
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > min_colours
    return pixels
