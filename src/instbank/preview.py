"""Contact sheet of a bank (``instbank preview``): what the crops look like, class by class.

One row per class (classes without crops get no row unless asked for by name), most frequent first;
up to ``per_class`` crops per row, each shown with its alpha over a checkerboard (so what the bank
calls "object" is what is not checkered) and labelled under it with its source image id and
annotation id; a red corner marks a truncated crop (its mask touches the source image border).
The row label gives the class name, id and crop count. ``--html`` adds a static page beside the PNG:
the sheet and a table of every class's crop count. On a bank with keypoints each crop shows its
labeled keypoints (filled dot: visible, hollow: labeled but not visible; the object's left side
orange, right side blue, others green) and the skeleton's lines between labeled ones.

Drawn with Pillow (``ImageDraw`` and its default font); no torch.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

SORTS = ("area", "random")
#: Thumbnails are at most this many pixels wide (a 128 px crop is shown at 96 px): 8 crops per
#: row then fit a 1000 px wide sheet, readable on a laptop screen without zooming.
MAX_THUMB = 96
LABEL_WIDTH = 170  # class name column; "traffic light" and most LVIS names fit at 13 px
CHECKER = 8  # checkerboard square, thumbnail pixels
PAD = 6
COLUMN_GAP = 30  # between columns of class rows, with a rule in the middle
MIN_WIDTH = 640  # room for the title line when only a few narrow rows are shown
CAPTION_FONT, LABEL_FONT = 10, 13
#: Several columns of class rows when there are many classes, so that the sheet is about as wide
#: as a screen is (4:3) instead of one very tall strip (80 COCO classes: 4 columns of 20 rows).
SHEET_ASPECT = 4 / 3
#: Rows beyond this many classes are left out (named in the title); LVIS has 1203 classes, whose
#: full sheet would be ~150 megapixels: ask for the classes wanted with ``classes=``.
MAX_CLASSES = 100
BACKGROUND, INK, MUTED, RULE, TRUNCATED_MARK = (255, 255, 255), (20, 20, 20), (110, 110, 110), (225, 225, 225), (220, 40, 40)
#: Keypoint colours by side (``left_*`` / ``right_*`` names, as COCO's), and the dot radius in pixels.
LEFT, RIGHT, MIDDLE, DOT = (255, 140, 0), (30, 120, 255), (40, 200, 60), 2.0


@dataclass(frozen=True)
class SheetRow:
    """One class row: contiguous ``class_id``, its ``name``, its crop ``count`` in the bank and the
    int64 ``indices`` of the crops shown (at most ``per_class``)."""

    class_id: int
    name: str
    count: int
    indices: np.ndarray


@dataclass(frozen=True)
class PreviewResult:
    """What ``write_preview`` wrote: the PNG, the HTML page (or None), the rows, the sheet size."""

    png: Path
    html: Path | None
    rows: list[SheetRow]
    size: tuple[int, int]


def select_rows(
    bank,
    per_class: int = 8,
    classes: Sequence[str | int] | None = None,
    sort: str = "area",
    seed: int = 0,
    max_classes: int = MAX_CLASSES,
) -> list[SheetRow]:
    """The rows of the sheet.

    ``classes``: names or ids, shown in that order (even with no crops); ``None``: the
    ``max_classes`` classes with the most crops (ties by id), classes without crops left out.
    ``sort``: ``"area"`` shows each class's largest source objects (most detail), ``"random"`` a
    uniform sample drawn from ``seed``.
    Raises ``ValueError`` for an unknown class, sort or a ``per_class`` below 1.
    """
    from instbank.sampling import resolve_class_ids

    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    names = list(bank.class_names)
    counts = np.asarray(bank.class_frequencies, np.int64)
    if classes is None:
        order = np.lexsort((np.arange(len(counts)), -counts))
        wanted = [int(c) for c in order if counts[c] > 0][:max_classes]
    else:
        wanted = list(dict.fromkeys(resolve_class_ids(classes, names, "--classes")))  # "person,0" is one row
    crop_class = np.asarray(bank.crop_class_ids, np.int64)
    area = bank.meta_table["area"]
    rng = np.random.default_rng(seed)
    rows = []
    for c in wanted:
        members = np.flatnonzero(crop_class == c)
        if sort == "area":
            shown = members[np.argsort(-area[members], kind="stable")[:per_class]]
        else:
            shown = np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False))
        rows.append(SheetRow(c, names[c], int(counts[c]), shown))
    return rows


def default_font(size: int):
    """Pillow's default font at ``size`` pixels (shared by the pictures instbank draws)."""
    from PIL import ImageFont

    # Pillow >= 10.1 ships a scalable default font; older builds only have the fixed bitmap one.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def checkerboard(size: int, square: int = CHECKER) -> "Image.Image":
    """RGBA ``size x size`` light-grey checkerboard with ``square``-pixel squares."""
    from PIL import Image

    yy, xx = np.mgrid[:size, :size]
    light = ((yy // square + xx // square) % 2 == 0)[..., None]
    rgb = np.where(light, np.uint8(235), np.uint8(190)).repeat(3, axis=2)
    return Image.fromarray(np.dstack([rgb, np.full((size, size), 255, np.uint8)]), "RGBA")


def thumbnail(rgba: np.ndarray, size: int, board: "Image.Image") -> "Image.Image":
    """uint8 ``[4, S, S]`` crop -> RGB ``size x size`` image: alpha composited over ``board``."""
    from PIL import Image

    crop = Image.fromarray(np.ascontiguousarray(rgba.transpose(1, 2, 0)), "RGBA")
    if crop.size != (size, size):
        # Pillow resizes RGBA with premultiplied alpha, so letterbox black does not bleed in.
        crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    return Image.alpha_composite(board, crop).convert("RGB")


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid_columns(num_rows: int, panel_w: int, panel_h: int, aspect: float = SHEET_ASPECT) -> int:
    """How many columns of class rows make a sheet closest to ``aspect`` (width / height)."""
    if num_rows <= 1:
        return 1
    best = round(np.sqrt(aspect * num_rows * panel_h / panel_w))
    return int(min(max(best, 1), num_rows))


def contact_sheet(bank, rows: list[SheetRow], thumb: int | None = None, title: str = "") -> "Image.Image":
    """RGB sheet of ``rows`` (see ``select_rows``), read down then across when there are several
    columns of rows; ``thumb``: thumbnail side (default ``min(S, MAX_THUMB)``); ``title``: the top
    line."""
    from PIL import Image, ImageDraw

    size = thumb or min(bank.crop_size[0], MAX_THUMB)
    cell_w, cell_h = size + PAD, size + 2 * CAPTION_FONT + 3 * PAD
    panel_w = LABEL_WIDTH + max([len(r.indices) for r in rows] + [1]) * cell_w + COLUMN_GAP
    columns = grid_columns(len(rows), panel_w, cell_h)
    per_column = -(-len(rows) // columns) if rows else 0
    header = 2 * LABEL_FONT + 3 * PAD
    width = max(columns * panel_w - COLUMN_GAP + 2 * PAD, MIN_WIDTH)
    sheet = Image.new("RGB", (width, header + per_column * cell_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    small, big = default_font(CAPTION_FONT), default_font(LABEL_FONT)
    draw.text((PAD, PAD), _fit(draw, title, big, sheet.width - 2 * PAD), fill=INK, font=big)
    legend = "alpha over a checkerboard; under each crop: source image id / annotation id; red corner: truncated"
    if getattr(bank, "keypoint_spec", None) is not None:
        legend += "; keypoints: filled visible, hollow occluded (left orange, right blue)"
    draw.text((PAD, PAD + LABEL_FONT + PAD), _fit(draw, legend, small, sheet.width - 2 * PAD), fill=MUTED, font=small)
    board = checkerboard(size)
    for c in range(1, columns):
        x = c * panel_w - COLUMN_GAP // 2
        draw.line([(x, header), (x, sheet.height - PAD)], fill=RULE)
    for r, row in enumerate(rows):
        left, top = (r // per_column) * panel_w, header + (r % per_column) * cell_h
        draw.line([(left + PAD, top), (left + panel_w - COLUMN_GAP, top)], fill=RULE)
        _draw_row(sheet, draw, bank, row, left, top, size, board, (small, big))
    return sheet


def _draw_row(sheet, draw, bank, row: SheetRow, left: int, top: int, size: int, board, fonts) -> None:
    """One class: its label, then its crops with their captions, from ``(left, top)``."""
    small, big = fonts
    draw.text((left + PAD, top + PAD), _fit(draw, row.name, big, LABEL_WIDTH - 2 * PAD), fill=INK, font=big)
    draw.text((left + PAD, top + PAD + LABEL_FONT + 4), f"id {row.class_id} · {row.count} crop{'s' if row.count != 1 else ''}", fill=MUTED, font=small)
    if not len(row.indices):
        draw.text((left + LABEL_WIDTH, top + PAD + size // 2), "no crops in this bank", fill=MUTED, font=small)
        return
    meta = bank.meta_table[row.indices]
    spec = getattr(bank, "keypoint_spec", None)
    points = None if spec is None else bank.get_keypoints(row.indices)
    for j, rgba in enumerate(bank.get_many(row.indices)):
        x, y = left + LABEL_WIDTH + j * (size + PAD), top + PAD
        sheet.paste(thumbnail(rgba, size, board), (x, y))
        if points is not None:
            draw_keypoints(draw, points[j], spec, size / rgba.shape[-1], (x, y), size)
        if meta["truncated"][j]:
            draw.polygon([(x + size - 12, y), (x + size, y), (x + size, y + 12)], fill=TRUNCATED_MARK)
        for line, text in enumerate((f"img {meta['image_id'][j]}", f"ann {meta['ann_id'][j]}")):
            draw.text((x, y + size + 2 + line * (CAPTION_FONT + 2)), _fit(draw, text, small, size), fill=MUTED, font=small)


def draw_keypoints(draw, points: np.ndarray, spec, scale: float, origin: tuple[int, int], size: int) -> None:
    """One crop's keypoints float32 ``[J, 3]`` (crop pixels) on its ``size`` px thumbnail at
    ``origin`` (``scale`` thumbnail pixels per crop pixel): skeleton lines between labeled points,
    then a dot per labeled point; points outside the thumbnail are left out (they would land on
    the next crop)."""
    side = [LEFT if n.startswith("left_") else RIGHT if n.startswith("right_") else MIDDLE for n in spec.names]
    xy = points[:, :2] * scale + np.asarray(origin, np.float32)
    shown = (points[:, 2] > 0) & (xy >= origin).all(axis=1) & (xy <= np.asarray(origin) + size).all(axis=1)
    for a, b in spec.skeleton:
        if shown[a] and shown[b]:
            draw.line([tuple(xy[a]), tuple(xy[b])], fill=side[b] if side[a] == side[b] else MIDDLE, width=1)
    for (px, py), v, colour, on in zip(xy.tolist(), points[:, 2], side, shown):
        if on:
            draw.ellipse([px - DOT, py - DOT, px + DOT, py + DOT], fill=colour if v >= 2 else None, outline=colour)


def sheet_title(bank, rows: list[SheetRow], sort: str) -> str:
    """The sheet's top line: bank, version, size, which classes are shown and how crops were picked."""
    counts = np.asarray(bank.class_frequencies)
    with_crops = int((counts > 0).sum())
    return (
        f"{bank.path.name}  {bank.version}  ·  {len(bank)} crops of {bank.crop_size[0]}px  ·  "
        f"{len(rows)} rows; {with_crops} of {len(counts)} classes have crops  ·  crops by {sort}"
    )


def write_preview(
    bank_path: str | os.PathLike,
    out: str | os.PathLike,
    per_class: int = 8,
    classes: Sequence[str | int] | None = None,
    sort: str = "area",
    seed: int = 0,
    html_page: bool = False,
    thumb: int | None = None,
) -> PreviewResult:
    """Write the contact sheet of the bank at ``bank_path`` to the PNG ``out`` (and, with
    ``html_page``, ``out`` with suffix ``.html`` beside it). Arguments as ``select_rows``."""
    from instbank.storage import open_bank

    bank = open_bank(bank_path)
    rows = select_rows(bank, per_class, classes, sort, seed)
    sheet = contact_sheet(bank, rows, thumb, sheet_title(bank, rows, sort))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    page = write_html(bank, rows, out) if html_page else None
    return PreviewResult(out, page, rows, sheet.size)


def write_html(bank, rows: list[SheetRow], png: Path) -> Path:
    """A static page beside ``png``: the sheet, then every class's crop count (classes on the
    sheet first, as ordered there)."""
    counts = np.asarray(bank.class_frequencies, np.int64)
    total = max(int(counts.sum()), 1)
    shown = {r.class_id: len(r.indices) for r in rows}
    order = [r.class_id for r in rows] + [int(c) for c in np.lexsort((np.arange(len(counts)), -counts)) if int(c) not in shown]
    names = bank.class_names
    body = "\n".join(
        f"<tr{' class=empty' if counts[c] == 0 else ''}><td>{c}</td><td>{html.escape(names[c])}</td>"
        f"<td>{counts[c]}</td><td>{100 * counts[c] / total:.1f}%</td><td>{shown.get(c, 0)}</td></tr>"
        for c in order
    )
    title = html.escape(f"{bank.path.name} ({bank.version})")
    page = png.with_suffix(".html")
    page.write_text(
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}}
td,th{{padding:2px 10px;border-bottom:1px solid #ddd;text-align:right}} td:nth-child(2){{text-align:left}}
tr.empty{{color:#999}} img{{max-width:100%}}</style></head>
<body><h1>{title}</h1>
<p>{len(bank)} crops of {bank.crop_size[0]}x{bank.crop_size[1]} px, {len(counts)} classes, {int((counts == 0).sum())} without crops.</p>
<img src="{html.escape(png.name)}" alt="contact sheet">
<h2>Crops per class</h2>
<table><tr><th>id</th><th>class</th><th>crops</th><th>share</th><th>on the sheet</th></tr>
{body}
</table></body></html>
"""
    )
    return page
