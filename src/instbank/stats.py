"""What is in a bank: counts, classes, source object sizes, bytes on disk (``instbank stats``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

# COCO's size buckets (area in source pixels): small < 32^2 <= medium < 96^2 <= large.
SIZE_BUCKETS = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, float("inf")))


def _bytes_on_disk(path: Path) -> int:
    from instbank.storage.url import RemotePath

    if isinstance(path, RemotePath):  # a bank at a URL: the objects' sizes
        from instbank.storage.remote import bytes_stored

        return bytes_stored(path)
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def bank_stats(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able summary of the bank at ``path`` (any backend)."""
    from instbank.storage import get_backend, load_manifest

    # The reader itself, not open_bank: only metadata is read, which a memmap or LMDB bank at a
    # URL gives without being pulled.
    m = load_manifest(path)
    bank = get_backend(m["backend"]).Reader(path, m)
    meta = bank.meta_table
    freqs = bank.class_frequencies
    area = meta["area"].astype(np.float64)
    sizes = {name: int(((area >= lo) & (area < hi)).sum()) for name, lo, hi in SIZE_BUCKETS}
    quantiles = {f"p{q}": float(np.percentile(area, q)) for q in (5, 25, 50, 75, 95)} if len(area) else {}
    side = np.maximum(meta["src_box"][:, 2] - meta["src_box"][:, 0], meta["src_box"][:, 3] - meta["src_box"][:, 1])
    raw = int(len(bank)) * 4 * bank.crop_size[0] * bank.crop_size[1]
    on_disk = _bytes_on_disk(bank.path)
    return {
        "path": str(bank.path),
        "backend": m["backend"],
        "version": bank.version,
        "format_version": m["format_version"],
        "num_crops": len(bank),
        "crop_size": list(bank.crop_size),
        "num_classes": bank.num_classes,
        "class_names": bank.class_names,
        "class_frequencies": freqs.tolist(),
        "classes_without_crops": int((freqs == 0).sum()),
        "num_images": int(len(np.unique(meta["image_id"]))) if len(meta) else 0,
        "truncated_fraction": float(meta["truncated"].mean()) if len(meta) else 0.0,
        "area_buckets": sizes,
        "area_quantiles": quantiles,
        "upscaled_fraction": float((side < bank.crop_size[0]).mean()) if len(meta) else 0.0,
        "bytes_on_disk": on_disk,
        "bytes_raw": raw,
        "compression": (raw / on_disk) if on_disk else None,
        "num_shards": len(m["shards"]),
        "backend_options": m.get("backend_options", {}),
        "skipped": m.get("skipped", {}),
        "keypoints": m.get("keypoints"),
        "skipped_images": m.get("build", {}).get("skipped_images", {}),
        "lost_instances": m.get("build", {}).get("lost_instances", {}),
        "skip_examples": m.get("build", {}).get("skip_examples", {}),
        "build": {k: v for k, v in m.get("build", {}).items()
                  if k not in ("skip_examples", "skipped_images", "lost_instances")},
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def skip_lines(skipped: dict[str, int], skipped_images: dict[str, int], lost: dict[str, int]) -> list[str]:
    """The skip summary in words: images dropped whole (and the instances on them), then
    instances dropped on their own."""
    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))

    instances = {k: v for k, v in skipped.items() if k not in skipped_images}
    lines = []
    if skipped_images:
        lines.append(f"skipped {sum(skipped_images.values())} image(s) ({listed(skipped_images)}), "
                     f"with {sum(lost.values())} instance(s) on them")
    if instances:
        lines.append(f"skipped {sum(instances.values())} annotation(s) ({listed(instances)})")
    return lines


def example_line(reason: str, example: Any) -> str:
    """One skip example in words: ``reason: file (image 12, annotation 7): detail``."""
    if not isinstance(example, dict):  # a bank written before examples were objects
        return f"{reason}: {example}"
    ids = [f"{name} {example[key]}" for name, key in (("image", "image_id"), ("annotation", "ann_id"))
           if example.get(key) is not None]
    where = f" ({', '.join(ids)})" if ids else ""
    detail = f": {example['detail']}" if example.get("detail") else ""
    return f"{reason}: {example.get('file')}{where}{detail}"


def _codec_words(options: dict[str, Any]) -> str:
    """``{"codec": "zstd", "level": 3, "filter": "up-rgb"}`` -> ``codec zstd, level 3, filter up-rgb``."""
    return ", ".join(f"{k} {v}" for k, v in options.items()) or "no codec options"


def print_stats(s: dict[str, Any], top: int = 10) -> None:
    """Readable tables of ``bank_stats`` output on stdout."""
    from rich.table import Table

    from instbank.progress import console as make_console

    console = make_console()
    head: list[tuple[str, str]] = []
    head.append(("bank", s["path"]))
    head.append(("version", f"{s['version']}  (format {s['format_version']}, {s['num_shards']} shard(s))"))
    head.append(("crops", f"{s['num_crops']} of {s['crop_size'][0]}x{s['crop_size'][1]} from {s['num_images']} images"))
    head.append(("classes", f"{s['num_classes']} ({s['classes_without_crops']} without crops)"))
    head.append(("on disk", f"{_human_bytes(s['bytes_on_disk'])} (raw {_human_bytes(s['bytes_raw'])}"
                 + (f", compressed {s['compression']:.2f}x" if s["compression"] else "") + f"; {_codec_words(s['backend_options'])})"))
    if s.get("keypoints"):
        names = s["keypoints"].get("names", [])
        head.append(("keypoints", f"{len(names)} per crop ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}), "
                                  f"{len(s['keypoints'].get('skeleton', []))} skeleton lines"))
    b = s["area_buckets"]
    head.append(("object sizes", f"small {b['small']}, medium {b['medium']}, large {b['large']} (COCO area buckets); "
                 f"truncated {100 * s['truncated_fraction']:.1f}%, upscaled {100 * s['upscaled_fraction']:.1f}%"))
    if s["area_quantiles"]:
        head.append(("area quantiles", ", ".join(f"{k} {v:.0f}" for k, v in s["area_quantiles"].items()) + " px"))
    for k, line in enumerate(skip_lines(s["skipped"], s["skipped_images"], s["lost_instances"]) or ["nothing"]):
        head.append(("skipped" if k == 0 else "", line.removeprefix("skipped ")))
    for reason, items in sorted(s["skip_examples"].items()):
        head.append(("", "  " + example_line(reason, items[0])))
    build = s["build"]
    head.append(("build", ", ".join(f"{k}={build[k]}" for k in ("source", "kind", "size", "backend", "workers", "exif") if k in build)))
    if build.get("filters"):
        head.append(("filters", ", ".join(f"{k}={v}" for k, v in build["filters"].items())))
    width = max(len(key) for key, _ in head)
    for key, value in head:
        console.print(f"{key:<{width}}  {value}", markup=False)

    freqs = np.asarray(s["class_frequencies"])
    order = np.argsort(-freqs, kind="stable")
    order = order[freqs[order] > 0]  # empty classes are counted in the header, not listed
    table = Table(title="classes by crop count", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("crops", justify="right")
    table.add_column("share", justify="right")
    total = max(int(freqs.sum()), 1)
    shown = list(order[:top]) + ([None] if len(order) > 2 * top else []) + list(order[max(top, len(order) - top):])
    for c in shown:
        if c is None:
            table.add_row("...", "", "", "", "")
            continue
        rank = int(np.flatnonzero(order == c)[0]) + 1
        table.add_row(str(rank), str(int(c)), s["class_names"][c], str(int(freqs[c])), f"{100 * freqs[c] / total:.1f}%")
    console.print(table)
