"""``instbank`` command line (typer). Calls only the public API; imports heavy modules inside
commands so that ``instbank --help`` stays fast and never imports torch.

Every error the user can act on is one line on stderr (``error: <file>: <what is wrong>``), exit
code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: flags shown as flags, no boxes that wrap in logs
    help="Build an instance bank for copy-paste augmentation, inspect it, and feed it to training.",
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": False}
# What each backend writes, default first (instbank.storage.registry.CODECS; a literal here keeps
# `--help` free of imports; tests/test_cli.py checks the two agree).
_CODECS_HELP = "memmap: raw; lmdb: zstd; webdataset: zstd (default), raw, png"


class _CommandInterrupted(Exception):
    """A ``KeyboardInterrupt`` (SIGINT, or SIGTERM via ``Terminated``) carried out of a command:
    typer turns one into a silent exit code 130, and the user must be told how far it got."""

    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__(str(interrupt))
        self.interrupt = interrupt


def _interruptible(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _CommandInterrupted(e) from None

    return run

# Options a --config YAML may set for `build` (keys as in the CLI, dashes or underscores).
_BUILD_DEFAULTS: dict[str, Any] = {
    "backend": "memmap",
    "size": 128,
    "workers": None,
    "min_area": 0,
    "min_side": 0,
    "max_aspect": 0.0,
    "skip_truncated": False,
    "crowd": "skip",
    "box_masks": False,
    "exif": "follow",
    "shard_images": None,
    "engine": "local",
    "ray_address": None,
    "codec": None,
    "strict": False,
    "splits": None,
    "category": None,
    "class_map": None,
    "min_predicted_iou": 0.0,
    "min_stability_score": 0.0,
    "max_missing_images": 0.5,
    "max_image_pixels": 1 << 29,
    "keypoints": True,
    "allow_outside_root": False,
}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    _DEBUG["on"] = debug


def _load_config(path: Optional[Path]) -> dict[str, Any]:
    from instbank.errors import InputError

    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: config must be a mapping of option: value")
    build = data.get("build", data)
    cfg = {str(k).replace("-", "_"): v for k, v in build.items()}
    unknown = sorted(set(cfg) - set(_BUILD_DEFAULTS) - {"sampler", "paste", "coco", "yolo", "sa1b", "images", "out"})
    if unknown:
        raise InputError(f"{path}: unknown build option(s) {', '.join(unknown)}; valid: {', '.join(sorted(_BUILD_DEFAULTS))}")
    return cfg


@app.command()
@_interruptible
def build(
    coco: Optional[Path] = typer.Option(None, "--coco", help="COCO instances json (polygons and RLE)."),
    yolo: Optional[Path] = typer.Option(None, "--yolo", help="YOLO-seg (or YOLO-pose, with --box-masks) data.yaml or a dir with images/ and labels/."),
    sa1b: Optional[Path] = typer.Option(None, "--sa1b", help="SA-1B directory: sa_*.json beside sa_*.jpg (subdirectories too)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Images directory for --coco or --sa1b (default: guessed / beside each json)."),
    out: str = typer.Option(..., "--out", metavar="<path>", help="Bank directory or URL (s3://bucket/bank, any fsspec URL) to write."),
    backend: Optional[str] = typer.Option(None, "--backend", help="memmap | lmdb | webdataset (default: memmap)"),
    size: Optional[int] = typer.Option(None, "--size", help="Crop side S in pixels (default: 128)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes (default: all cores)."),
    min_area: Optional[int] = typer.Option(None, "--min-area", help="Skip masks under this many source pixels."),
    min_side: Optional[int] = typer.Option(None, "--min-side", help="Skip tight boxes whose shorter side is smaller."),
    max_aspect: Optional[float] = typer.Option(None, "--max-aspect", help="Skip boxes longer/shorter above this (0: off)."),
    skip_truncated: Optional[bool] = typer.Option(None, "--skip-truncated/--keep-truncated", help="Skip masks touching the border."),
    crowd: Optional[str] = typer.Option(None, "--crowd", help="COCO iscrowd: skip | include (default: skip)."),
    box_masks: Optional[bool] = typer.Option(None, "--box-masks/--no-box-masks", help="Box-only labels become rectangle masks."),
    exif: Optional[str] = typer.Option(None, "--exif", help="EXIF orientation: follow | ignore (default: follow)."),
    shard_images: Optional[int] = typer.Option(None, "--shard-images", help="Images per shard (default: auto)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="local | ray (default: local)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (engine ray)."),
    codec: Optional[str] = typer.Option(None, "--codec", help=f"Backend codec: {_CODECS_HELP}."),
    splits: Optional[str] = typer.Option(None, "--splits", help="YOLO data.yaml splits, e.g. train,val (default: all)."),
    category: Optional[str] = typer.Option(None, "--category", help="--sa1b: class of every mask (default: object), or of masks not in --class-map."),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="--sa1b: json {annotation id: class name}."),
    min_predicted_iou: Optional[float] = typer.Option(None, "--min-predicted-iou", help="--sa1b: keep masks with predicted_iou >= this (SAM used 0.88)."),
    min_stability_score: Optional[float] = typer.Option(None, "--min-stability-score", help="--sa1b: keep masks with stability_score >= this (SAM used 0.95)."),
    backend_option: Optional[list[str]] = typer.Option(None, "--backend-option", "-O",
                                                       help="Backend writer option KEY=VALUE, e.g. level=9, filter=none, maxcount=10000."),
    keypoints: Optional[bool] = typer.Option(None, "--keypoints/--no-keypoints",
                                             help="Store COCO / YOLO-pose keypoints with the crops when the data has them (default: yes)."),
    max_image_pixels: Optional[int] = typer.Option(None, "--max-image-pixels", min=0,
                                                   help="Skip images with more pixels, read from the header before decoding (default: 2**29; 0: no limit)."),
    max_missing_images: Optional[float] = typer.Option(None, "--max-missing-images", min=0.0, max=1.0,
                                                       help="Fail before building when more of the images are missing (default: 0.5)."),
    allow_outside_root: Optional[bool] = typer.Option(None, "--allow-outside-root/--inside-root-only",
                                                      help="Read images whose path leaves the images folder (.., absolute, symlinks)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bank at --out."),
    resume: bool = typer.Option(False, "--resume", help="Keep finished shards of an interrupted build."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Any skipped item is an error."),
) -> None:
    """Build a bank from COCO json, YOLO-seg labels or SA-1B jsons."""
    from instbank.errors import InputError

    given = {k: v for k, v in locals().items() if k in _BUILD_DEFAULTS and v is not None}
    file_cfg = _load_config(config)
    opts = {**_BUILD_DEFAULTS, **{k: v for k, v in file_cfg.items() if k in _BUILD_DEFAULTS}, **given}
    coco = coco or (Path(file_cfg["coco"]) if file_cfg.get("coco") else None)
    yolo = yolo or (Path(file_cfg["yolo"]) if file_cfg.get("yolo") else None)
    sa1b = sa1b or (Path(file_cfg["sa1b"]) if file_cfg.get("sa1b") else None)
    images = images or (Path(file_cfg["images"]) if file_cfg.get("images") else None)
    if sum(source is not None for source in (coco, yolo, sa1b)) != 1:
        raise InputError("build: give exactly one of --coco ANN.json, --yolo DATA.yaml|DIR or --sa1b DIR")
    from instbank.storage import BACKENDS

    for name, allowed in (("crowd", ("skip", "include")), ("exif", ("follow", "ignore")), ("engine", ("local", "ray")),
                          ("backend", tuple(BACKENDS))):
        if opts[name] not in allowed:
            raise InputError(f"build: --{name} must be one of {', '.join(allowed)}, got {opts[name]!r}")
    for name in ("workers", "shard_images"):
        if opts[name] is not None and (not isinstance(opts[name], int) or opts[name] < 1):
            raise InputError(f"build: --{name.replace('_', '-')} must be a positive integer, got {opts[name]!r}")

    from instbank.build import BuildConfig, build_bank
    from instbank.crops import CropFilters
    from instbank.storage.writer import check_destination, writer_options

    # Everything about the output is checked before the input is read (minutes for a large json)
    # and before anything is written: the options, the backend's codec and -O keys, and --out (a
    # typo, an existing bank, a build running there). The build checks --out again under its lock.
    try:
        cfg = BuildConfig(
            size=opts["size"],
            backend=str(opts["backend"]),
            backend_options=_backend_options(opts["codec"], backend_option),
            filters=CropFilters(opts["min_area"], opts["min_side"], float(opts["max_aspect"]), bool(opts["skip_truncated"])),
            exif=opts["exif"],
            shard_images=opts["shard_images"],
            max_image_pixels=opts["max_image_pixels"],
        )
    except ValueError as e:
        raise InputError(f"build: {e}") from None
    writer_options(cfg.backend, cfg.backend_options)
    check_destination(out, "resume" if resume else "overwrite" if overwrite else "new")

    t_read = time.perf_counter()
    if coco is not None:
        from instbank.formats.coco import read_coco

        dataset = read_coco(coco, images, crowd=opts["crowd"], box_masks=bool(opts["box_masks"]), keypoints=bool(opts["keypoints"]))
    elif yolo is not None:
        from instbank.formats.yolo import read_yolo

        split_list = opts["splits"].split(",") if isinstance(opts["splits"], str) else opts["splits"]
        dataset = read_yolo(yolo, box_masks=bool(opts["box_masks"]), splits=split_list, keypoints=bool(opts["keypoints"]))
    else:
        from instbank.formats.sa1b import read_sa1b

        dataset = read_sa1b(sa1b, images, category=opts["category"], class_map=opts["class_map"],
                            min_predicted_iou=float(opts["min_predicted_iou"]),
                            min_stability_score=float(opts["min_stability_score"]), min_area=cfg.filters.min_area)
    _err(f"read {dataset.kind} {dataset.source}: {len(dataset.images)} images, {dataset.num_instances} instances, "
         f"{len(dataset.classes)} classes ({time.perf_counter() - t_read:.1f}s)")
    for note in dataset.notes:
        _err(f"note: {note}")

    engine_options = {"address": opts["ray_address"]} if opts["engine"] == "ray" and opts["ray_address"] else None
    from instbank.progress import build_progress

    with build_progress(len(dataset.images)) as progress:
        report = build_bank(dataset, out, cfg, workers=opts["workers"], overwrite=overwrite, resume=resume,
                            strict=bool(opts["strict"]), engine=opts["engine"], engine_options=engine_options,
                            progress=progress, max_missing=float(opts["max_missing_images"]),
                            allow_outside_root=bool(opts["allow_outside_root"]))
    _print_report(report)


def _print_report(report) -> None:
    from instbank.progress import console as make_console
    from instbank.stats import example_line, skip_lines

    console = make_console(stderr=True)
    console.print(f"[bold]bank[/bold] {report.out}  [bold]version[/bold] {report.version}")
    console.print(f"kept {report.num_crops} crops from {report.num_images} images in {report.num_shards} shard(s)"
                  + (f" ({report.reused_shards} reused)" if report.reused_shards else "")
                  + f", {report.seconds:.1f}s, {report.crops_per_s:.0f} crops/s")
    for line in skip_lines(report.skipped, report.skipped_images, report.lost_instances):
        console.print(line, markup=False)
    for reason, items in sorted(report.skip_examples.items()):
        for item in items[:2]:
            console.print("  " + example_line(reason, item), markup=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)


@app.command()
@_interruptible
def stats(
    bank: str = typer.Argument(..., help="Bank directory or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG of class and size plots."),
    top: int = typer.Option(10, "--top", help="Classes to list at the head and tail."),
) -> None:
    """Summarise what is in a bank."""
    from instbank.stats import bank_stats, print_stats

    summary = bank_stats(bank)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
    else:
        print_stats(summary, top=top)
    if plot is not None:
        from instbank.plots import plot_stats

        plot_stats(bank, plot)
        _err(f"wrote {plot}")


@app.command()
@_interruptible
def preview(
    bank: Path = typer.Argument(..., help="Bank directory."),
    out: Path = typer.Option(..., "--out", help="PNG contact sheet to write."),
    per_class: int = typer.Option(8, "--per-class", min=1, help="Crops shown per class."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names or ids (default: every class with crops)."),
    sort: str = typer.Option("area", "--sort", help="Which crops of a class: area (largest first) | random."),
    seed: int = typer.Option(0, "--seed", help="Seed of --sort random."),
    html: bool = typer.Option(False, "--html", help="Also write a static page (sheet + per-class counts) beside the PNG."),
) -> None:
    """Draw a contact sheet of the crops, one row per class."""
    from instbank.errors import InputError
    from instbank.preview import write_preview

    wanted = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    wanted = [int(c) if c.isdigit() else c for c in wanted] if wanted else None
    try:
        result = write_preview(bank, out, per_class=per_class, classes=wanted, sort=sort, seed=seed, html_page=html)
    except ValueError as e:  # an unknown class or sort: name the bank it was checked against
        raise InputError(f"{bank}: {e}") from None
    _err(f"wrote {result.png} ({result.size[0]}x{result.size[1]}, {len(result.rows)} classes)"
         + (f" and {result.html}" if result.html else ""))


@app.command("paste-demo")
@_interruptible
def paste_demo(
    bank: Path = typer.Argument(..., help="Bank directory."),
    coco: Optional[Path] = typer.Option(None, "--coco", help="COCO json: its images, with their instances."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of pictures (or the images dir for --coco)."),
    out: Path = typer.Option(..., "--out", help="PNG to write (original | pasted, one row per image)."),
    n: int = typer.Option(4, "--n", min=1, help="Images."),
    k: int = typer.Option(6, "--k", min=0, help="Crops pasted into each image."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the crop draw and the placement."),
    size: int = typer.Option(512, "--size", min=32, help="Side of the square batch the images are letterboxed into."),
    keypoints: bool = typer.Option(False, "--keypoints", help="Draw keypoints (synthetic on persons when the bank has none)."),
    panoptic: bool = typer.Option(False, "--panoptic", help="Add a third panel: the painted panoptic map."),
    in_batch: float = typer.Option(0.0, "--in-batch", min=0.0, max=1.0,
                                   help="Share of pastes cut from the other images of the batch (0: bank only)."),
) -> None:
    """Paste bank crops into real images with BankCopyPaste and draw before | after."""
    from instbank.errors import InputError
    from instbank.paste_demo import render_paste_demo

    if coco is None and images is None:
        raise InputError("paste-demo: give --coco ANN.json or --images DIR")
    result = render_paste_demo(bank, out, coco=coco, images=images, n=n, k=k, seed=seed, canvas=size,
                               keypoints=keypoints, panoptic=panoptic, in_batch=in_batch)
    _err(f"wrote {result.summary()}")


@app.command()
@_interruptible
def convert(
    src: str = typer.Argument(..., help="Bank to read (a directory or URL)."),
    dst: str = typer.Argument(..., help="Bank directory or URL to write."),
    backend: Optional[str] = typer.Option(None, "--backend", help="memmap | lmdb | webdataset (default: the source's)."),
    codec: Optional[str] = typer.Option(None, "--codec", help=f"Backend codec: {_CODECS_HELP}."),
    backend_option: Optional[list[str]] = typer.Option(None, "--backend-option", "-O", help="Backend writer option KEY=VALUE."),
    shard_crops: Optional[int] = typer.Option(None, "--shard-crops", min=1, help="Re-shard: crops per output shard (default: as the source)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bank at DST."),
) -> None:
    """Write a bank again: another backend or codec, or other shards (streaming; the content hash is kept)."""
    from instbank.progress import count_progress
    from instbank.storage import BACKENDS, load_manifest
    from instbank.storage.convert import convert_bank

    if backend is not None:
        _check_backend(backend, BACKENDS)
    total = load_manifest(src)["num_crops"]
    with count_progress(total, "converting") as progress:
        manifest = convert_bank(src, dst, backend, _backend_options(codec, backend_option), overwrite=overwrite,
                                shard_crops=shard_crops, progress=progress)
    _err(f"wrote {dst}: {manifest['num_crops']} crops, version {manifest['version']}")


@app.command()
@_interruptible
def verify(bank: str = typer.Argument(..., help="Bank directory or URL.")) -> None:
    """Recompute every crop digest and the content hash; exit 1 naming the crop/shard at fault."""
    from instbank.progress import count_progress
    from instbank.storage.verify import verify_bank

    try:
        from instbank.storage import load_manifest

        total = load_manifest(bank)["num_crops"]
    except Exception:  # noqa: BLE001 - verify_bank reports an unreadable manifest itself
        total = 0
    with count_progress(total, "verifying") as progress:
        report = verify_bank(bank, progress=progress)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@_interruptible
def merge(
    banks: list[str] = typer.Argument(..., help="Banks to concatenate, in order (directories or URLs)."),
    out: str = typer.Option(..., "--out", metavar="<path>", help="Bank directory or URL to write."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Backend of the result (default: the first bank's)."),
    shard_crops: Optional[int] = typer.Option(None, "--shard-crops", min=1, help="Crops per output shard (default: one per input shard)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bank at --out."),
) -> None:
    """Concatenate banks with the same crop size (class tables unioned by name)."""
    from instbank.progress import count_progress
    from instbank.storage import BACKENDS, load_manifest
    from instbank.storage.merge import merge_banks

    if backend is not None:
        _check_backend(backend, BACKENDS)
    total = sum(load_manifest(b)["num_crops"] for b in banks)
    with count_progress(total, "merging") as progress:
        manifest = merge_banks(banks, out, backend=backend, overwrite=overwrite, shard_crops=shard_crops, progress=progress)
    _err(f"wrote {out}: {manifest['num_crops']} crops, {manifest['num_classes']} classes, version {manifest['version']}")


@app.command()
@_interruptible
def pull(
    url: str = typer.Argument(..., help="Bank URL: s3://bucket/bank, gs://..., any fsspec URL."),
    dest: Path = typer.Argument(..., help="Local directory to copy it into."),
) -> None:
    """Copy a bank from object storage to a local directory, every crop checked against its digest
    and the content hash (memmap and LMDB banks are read from disk); rerun to resume."""
    from instbank.progress import count_progress
    from instbank.storage import load_manifest
    from instbank.storage.pull import pull_bank

    total = load_manifest(url)["num_crops"]
    with count_progress(total, "pulling") as progress:
        manifest, reused = pull_bank(url, dest, progress=progress)
    kept = f" ({reused} of {len(manifest['shards'])} shards already there)" if reused else ""
    _err(f"pulled {url} to {dest}: {manifest['num_crops']} crops, version {manifest['version']}{kept}")


def _backend_options(codec: Optional[str], pairs: Optional[list[str]]) -> dict[str, Any]:
    """``--codec`` plus ``-O KEY=VALUE`` pairs; numbers become int/float (writers check types)."""
    from instbank.errors import InputError

    options: dict[str, Any] = {"codec": codec} if codec else {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--backend-option {pair!r}: expected KEY=VALUE")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return options


def _check_backend(name: str, valid) -> None:
    from instbank.errors import InputError

    if name not in valid:
        raise InputError(f"unknown backend {name!r}; valid backends: {', '.join(valid)}")


def _err(line: str) -> None:
    typer.echo(line, err=True)


def main() -> None:
    """Console entry point: one-line errors for the project's own exceptions; SIGINT and SIGTERM
    end every worker and print one line (exit 130 / 143)."""
    from instbank.errors import InstbankError

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code instead of raising it
        if code == 130:  # typer's own answer to an interrupt outside a command body (parsing)
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except InstbankError as e:
        if _DEBUG["on"]:
            raise
        typer.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, _CommandInterrupted) as e:
        interrupt = e.interrupt if isinstance(e, _CommandInterrupted) else e
        typer.echo(f"error: {_interrupted_line(interrupt)}", err=True)
        sys.exit(128 + getattr(interrupt, "signum", signal.SIGINT))
    except Exception as e:  # usage errors and other exits
        # typer >= 0.29 vendors its own click, so match click's exception protocol, not its classes.
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            _usage_error(e)
            sys.exit(e.exit_code)
        if type(e).__name__ == "Exit" and isinstance(getattr(e, "exit_code", None), int):
            sys.exit(e.exit_code)
        if _DEBUG["on"]:
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


def _usage_error(e) -> None:
    """A usage error in one line, naming the command and where its help is."""
    if type(e).__name__ == "NoArgsIsHelpError":  # `instbank` or `instbank CMD` alone: the help itself
        e.show()
        return
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "instbank"
    message = " ".join(e.format_message().split())
    typer.echo(f"error: {where}: {message} (see {where} --help)", err=True)


def _raise_terminated(signum, frame) -> None:
    from instbank.errors import Terminated

    raise Terminated()


def _interrupted_line(e: KeyboardInterrupt) -> str:
    """What an interrupted command says: how far it got and, for a build, how to continue."""
    from instbank.errors import BuildInterrupted

    if isinstance(e, BuildInterrupted):
        return f"{e}; continue with: {_resume_command()}" if e.resumable else str(e)
    name = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
    return f"interrupted by {name} before the command finished; nothing was committed"


def _resume_command() -> str:
    """This command line with ``--resume`` (and without ``--overwrite``, which would start over)."""
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    return shlex.join(["instbank", *args, *([] if "--resume" in args else ["--resume"])])


if __name__ == "__main__":  # pragma: no cover
    main()
