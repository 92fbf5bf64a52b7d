"""The shipped configs/*.yaml: each builds the shipped sample through `instbank build --config`
(only the input and output given on the command line), its values reach the bank, and
docs/configs.md documents every key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, SAMPLE_COCO, SAMPLE_YOLO
from instbank.cli import _BUILD_DEFAULTS, app

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
INPUT = {"coco.yaml": ["--coco", str(SAMPLE_COCO)], "lvis.yaml": ["--coco", str(SAMPLE_COCO)],
         "yolo.yaml": ["--yolo", str(SAMPLE_YOLO)]}


def test_every_shipped_config_is_exercised():
    assert [p.name for p in CONFIGS] == sorted(INPUT)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_builds_the_sample(config: Path, tmp_path):
    out = tmp_path / "bank"
    result = CliRunner().invoke(app, ["build", "--config", str(config), *INPUT[config.name], "--out", str(out)])
    assert result.exit_code == 0, result.output
    build = yaml.safe_load(config.read_text())["build"]
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = manifest["build"]
    assert manifest["backend"] == build["backend"] and recorded["size"] == build["size"]
    assert recorded["exif"] == build["exif"]
    for key in ("min_area", "min_side", "max_aspect", "skip_truncated"):
        if key in build:
            assert recorded["filters"][key] == build[key], key
    if build.get("crowd") == "skip" and config.name != "yolo.yaml":
        assert manifest["skipped"].get("crowd") == 1  # the sample's one crowd annotation
    assert manifest["num_crops"] > 0


def test_sampler_section_feeds_bank_sampler(sample_coco_bank):
    from instbank.sampling import BankSampler

    sampler_cfg = yaml.safe_load((REPO / "configs" / "lvis.yaml").read_text())["sampler"]
    sampler = BankSampler(sample_coco_bank, 2, 3, **sampler_cfg)
    assert next(iter(sampler)).shape == (2, 3)


def test_docs_describe_every_key():
    doc = (REPO / "docs" / "configs.md").read_text()
    documented = set(re.findall(r"^\|\s*`([a-z_]+)`", doc, flags=re.M))
    in_files = set()
    for config in CONFIGS:
        for section, values in yaml.safe_load(config.read_text()).items():
            in_files |= set(values)
            assert f"`{section}:`" in doc, section
    assert in_files <= documented, sorted(in_files - documented)
    assert set(_BUILD_DEFAULTS) <= documented, sorted(set(_BUILD_DEFAULTS) - documented)
