"""Input readers for `umt shard`: one per format, each turning a collection into `Row`s.

A row is one input record: where its image is (a path, an http(s) URL or the bytes themselves),
its captions, a stable image key and where it came from. Readers never open images; a row that
is broken in a way only the reader can see (non-UTF-8 text, an unparsable JSON line, a missing
sidecar caption) carries a `Problem` so that the sharder reports it like any other failure.
Errors that make the whole input unusable (unknown format, missing column, no rows) raise
`SourceError` with a message that says what to change.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

FORMATS = ("csv", "tsv", "jsonl", "parquet", "coco", "karpathy", "folder")
TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Column names tried, in order, when --image-col / --caption-col are not given.
IMAGE_COLUMNS = ("image", "image_path", "path", "filepath", "file_name", "filename", "url")
CAPTION_COLUMNS = ("caption", "captions", "text", "txt", "sentence")
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Longer captions fail their row (tokenizers keep ~64 tokens; this is far past any caption).
MAX_CAPTION_CHARS = 16_384
# A CSV field of any length parses: an overlong caption then fails its row, not the run.
csv.field_size_limit(2**31 - 1)
# Karpathy splits: `restval` is the part of COCO val2014 that everyone trains on.
_KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


class SourceError(ValueError):
    """The input cannot be read at all; the message names the file and what to change."""


@dataclass(frozen=True)
class Problem:
    """Why the reader could not make a usable row: a stable reason code and a message for people."""

    reason: str
    message: str


@dataclass(frozen=True)
class Row:
    """One input record, before its image is opened."""

    file: str  # input file the row comes from (name only: the output must not depend on the cwd)
    index: int  # row index within that file (line, record or image entry)
    image: str | bytes  # absolute path, http(s) URL, or the encoded image itself
    image_key: str  # the same for every row made from one image
    captions: tuple[str, ...]
    problem: Problem | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # (column, JSON value) of --save-additional-columns


@dataclass(frozen=True)
class SourceSpec:
    """What to read and how: the input path plus the format-specific options."""

    path: Path
    format: str | None = None  # detected from the path when None
    image_col: str | None = None
    caption_col: str | None = None
    image_root: Path | None = None  # relative image paths are resolved against this
    split: str = "train"  # Karpathy only
    extra_cols: tuple[str, ...] = ()  # tables only: columns copied into each sample's json


@dataclass(frozen=True)
class Source:
    """The rows of an input, in input order, and the format they were read as."""

    format: str
    rows: list[Row]


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def read_source(spec: SourceSpec) -> Source:
    """Read every row of `spec.path`; raise `SourceError` if it is unusable or has no rows."""
    path = Path(spec.path)
    if not path.exists():
        raise SourceError(f"input {path} does not exist")
    if spec.format is not None and spec.format not in FORMATS:
        raise SourceError(
            f"unknown --format-in {spec.format!r}; choose one of {', '.join(FORMATS)}"
        )
    if spec.split not in SPLITS:
        raise SourceError(f"unknown --split {spec.split!r}; choose one of {', '.join(SPLITS)}")
    fmt = spec.format or detect_format(path)
    if spec.extra_cols and fmt not in TABLE_FORMATS:
        raise SourceError(
            f"--save-additional-columns applies to {'/'.join(TABLE_FORMATS)} inputs, "
            f"not to {path} ({fmt})"
        )
    if fmt == "folder":
        rows = list(read_folder(path))
    elif fmt in ("coco", "karpathy"):
        rows = list(read_json_collection(path, spec, fmt))
    elif fmt == "parquet":
        rows = list(read_parquet(path, spec))
    elif fmt == "jsonl":
        rows = list(read_jsonl(path, spec))
    else:
        rows = list(read_delimited(path, spec, delimiter="\t" if fmt == "tsv" else ","))
    if not rows:
        what = f"rows in split {spec.split!r}" if fmt == "karpathy" else "rows"
        raise SourceError(f"input {path} ({fmt}) has no {what}: nothing to shard")
    return Source(format=fmt, rows=rows)


def detect_format(path: Path) -> str:
    """Format from the path: a folder, a known suffix, or the content of a `.json` file."""
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    if suffix == ".json":
        return json_collection_format(load_json(path), path)
    raise SourceError(
        f"cannot tell the format of {path} from its name; pass --format-in ({', '.join(FORMATS)})"
    )


def json_collection_format(data: Any, path: Path) -> str:
    """`coco` for `images` + `annotations`, `karpathy` for `images` with `sentences`."""
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list):
        if "annotations" in data:
            return "coco"
        if not images or "sentences" in images[0]:
            return "karpathy"
    raise SourceError(
        f"{path} is neither a COCO captions file (images + annotations) nor a Karpathy split "
        "file (images with sentences); pass --format-in for tables in JSON Lines"
    )


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path} is not UTF-8 (byte {exc.start}): cannot read it") from exc
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}") from exc


# --- COCO and Karpathy -------------------------------------------------------------------------


def read_json_collection(path: Path, spec: SourceSpec, fmt: str) -> Iterator[Row]:
    data = load_json(path)
    detected = json_collection_format(data, path)
    if detected != fmt:
        raise SourceError(f"{path} looks like a {detected} file, not {fmt}: check --format-in")
    root = Path(spec.image_root) if spec.image_root else path.parent
    if fmt == "coco":
        return read_coco(data, path.name, root)
    return read_karpathy(data, path.name, root, spec.split)


def read_coco(data: dict, file: str, root: Path) -> Iterator[Row]:
    """One row per entry of `images[]`, with the captions of its `annotations[]` in file order."""
    captions: dict[Any, list[str]] = {}
    for number, annotation in enumerate(data["annotations"]):
        try:
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
        except (KeyError, TypeError) as exc:
            raise SourceError(f"{file}: annotation {number} has no image_id/caption") from exc
    for index, image in enumerate(data["images"]):
        try:
            image_id, file_name = image["id"], image["file_name"]
        except (KeyError, TypeError) as exc:
            raise SourceError(f"{file}: images[{index}] has no id/file_name") from exc
        yield Row(
            file=file,
            index=index,
            image=str(root / file_name),
            image_key=str(image_id),
            captions=tuple(captions.get(image_id, ())),
        )


def read_karpathy(data: dict, file: str, root: Path, split: str) -> Iterator[Row]:
    """One row per image of the split; `filepath` (COCO's train2014/val2014) joins the root."""
    wanted = _KARPATHY_SPLITS[split]
    for index, entry in enumerate(data["images"]):
        if entry.get("split") not in wanted:
            continue
        try:
            file_name = entry["filename"]
            captions = tuple(sentence["raw"] for sentence in entry["sentences"])
        except (KeyError, TypeError) as exc:
            raise SourceError(f"{file}: images[{index}] has no filename/sentences[].raw") from exc
        yield Row(
            file=file,
            index=index,
            image=str(root / entry.get("filepath", "") / file_name),
            image_key=str(entry.get("cocoid", file_name)),
            captions=captions,
        )


# --- image folder with sidecar captions ---------------------------------------------------------


def read_folder(root: Path) -> Iterator[Row]:
    """Every image under `root` (sorted, recursive); each non-blank line of `{stem}.txt` is a
    caption. A link to an image that is gone is a failed row, not skipped."""
    images = sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for index, image in enumerate(images):
        relative = image.relative_to(root).as_posix()
        sidecar = image.with_suffix(".txt")
        captions, problem = read_sidecar(sidecar, relative)
        if not image.exists():  # a dangling symlink
            problem = Problem("missing_file", f"{relative}: a link to {os.readlink(image)}, gone")
        yield Row(
            file=root.name,
            index=index,
            image=str(image),
            image_key=relative,
            captions=captions,
            problem=problem,
        )


def read_sidecar(sidecar: Path, relative: str) -> tuple[tuple[str, ...], Problem | None]:
    if not sidecar.is_file():
        return (), Problem("missing_caption", f"{relative}: no sidecar caption {sidecar.name}")
    raw = sidecar.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return (), Problem("not_utf8", f"{sidecar.name}: not UTF-8 at byte {exc.start}")
    return tuple(line for line in text.splitlines() if line.strip()), None


# --- tables: CSV / TSV / JSON Lines / Parquet ---------------------------------------------------


def read_delimited(path: Path, spec: SourceSpec, delimiter: str) -> Iterator[Row]:
    """Rows of a CSV/TSV. Every record is accounted for: one with more or fewer fields than the
    header (an unquoted delimiter in a caption), or a field spanning lines (a quote that closes
    far away), is a failed row naming its lines; a quote that never closes is an error naming
    the line it opens on (it would swallow the rest of the file)."""
    # surrogateescape keeps undecodable bytes as lone surrogates: the row is reported, the rest read.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            header = next(reader, [])
        except csv.Error as exc:
            raise SourceError(f"{path}: line 1 (the header) is not valid CSV: {exc}") from None
        image_col, caption_col = pick_columns(header, spec, path)
        check_extra_columns(header, spec, path)
        base = image_base(path, spec)
        index, first_line = 0, reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise SourceError(
                    f"{path}: the record starting on line {first_line} is not valid CSV ({exc}); "
                    "a quote that never closes would swallow every line after it"
                ) from None
            lines = (
                f"line {first_line}"
                if reader.line_num == first_line
                else f"lines {first_line}-{reader.line_num}"
            )
            first_line = reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue  # a blank line
            problem = None
            if len(fields) != len(header):
                problem = Problem(
                    "bad_row",
                    f"{lines}: {len(fields)} fields, the header has {len(header)} "
                    "(an unquoted delimiter in a caption?)",
                )
            elif any("\n" in f or "\r" in f for f in fields):
                problem = Problem(
                    "bad_row", f"{lines}: a field spans lines (a quote that closes too late?)"
                )
            record = dict(zip(header, fields))
            image, caption = record.get(image_col), record.get(caption_col)
            row = table_row(path.name, index, image, caption, base)
            if problem is not None:
                row = replace(row, problem=problem)
            yield with_extra(row, record, spec.extra_cols)
            index += 1


def read_jsonl(path: Path, spec: SourceSpec) -> Iterator[Row]:
    records: list[tuple[int, dict | Problem]] = []
    columns: dict[str, None] = {}  # ordered union of keys, for column detection and messages
    with open(path, "rb") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            record = parse_json_line(line, index)
            if isinstance(record, dict):
                columns.update(dict.fromkeys(record))
            records.append((index, record))
    if not records:
        return
    image_col, caption_col = pick_columns(list(columns), spec, path)
    check_extra_columns(list(columns), spec, path)
    base = image_base(path, spec)
    for index, record in records:
        if isinstance(record, Problem):
            yield Row(path.name, index, "", "", (), record)
            continue
        image, captions = record.get(image_col), record.get(caption_col)
        row = table_row(path.name, index, image, captions, base)
        yield with_extra(row, record, spec.extra_cols)


def parse_json_line(line: bytes, index: int) -> dict | Problem:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return Problem("not_utf8", f"line {index + 1} is not UTF-8 (byte {exc.start})")
    except json.JSONDecodeError as exc:
        return Problem("bad_record", f"line {index + 1} is not valid JSON: {exc.msg}")
    if not isinstance(record, dict):
        return Problem("bad_record", f"line {index + 1} is not a JSON object")
    return record


def read_parquet(path: Path, spec: SourceSpec) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise SourceError(f"{path} is not a readable Parquet file: {exc}") from exc
    image_col, caption_col = pick_columns(table_file.schema_arrow.names, spec, path)
    check_extra_columns(table_file.schema_arrow.names, spec, path)
    table = table_file.read(columns=list(dict.fromkeys([image_col, caption_col, *spec.extra_cols])))
    images = table.column(image_col).to_pylist()
    captions = table.column(caption_col).to_pylist()
    extra = {name: table.column(name).to_pylist() for name in spec.extra_cols}
    base = image_base(path, spec)
    for index, (image, caption) in enumerate(zip(images, captions)):
        row = table_row(path.name, index, image, caption, base)
        yield with_extra(
            row, {name: values[index] for name, values in extra.items()}, spec.extra_cols
        )


def pick_columns(columns: list[str], spec: SourceSpec, path: Path) -> tuple[str, str]:
    """The image and caption columns: as given, or the first known name present."""
    image_col = pick_column(columns, spec.image_col, IMAGE_COLUMNS, "--image-col", path)
    caption_col = pick_column(columns, spec.caption_col, CAPTION_COLUMNS, "--caption-col", path)
    return image_col, caption_col


def check_extra_columns(columns: list[str], spec: SourceSpec, path: Path) -> None:
    for name in spec.extra_cols:
        pick_column(columns, name, (), "--save-additional-columns", path)


def with_extra(row: Row, record: dict[str, Any], names: tuple[str, ...]) -> Row:
    """The row carrying the values of `names` from its record (missing ones are null)."""
    if not names:
        return row
    return replace(row, extra=tuple((name, json_value(record.get(name))) for name in names))


def json_value(value: Any) -> Any:
    """`value` if JSON can hold it as it is, else its text (bytes as UTF-8, dates as ISO...)."""
    if isinstance(value, str) and not is_utf8(value):  # CSV bytes kept by surrogateescape
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def pick_column(
    columns: list[str], wanted: str | None, candidates: Iterable[str], flag: str, path: Path
) -> str:
    available = ", ".join(columns) if columns else "none"
    if wanted is not None:
        if wanted not in columns:
            raise SourceError(f"{path} has no column {wanted!r} ({flag}); its columns: {available}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise SourceError(
        f"{path}: none of the usual column names ({', '.join(candidates)}) is present; "
        f"pass {flag} (its columns: {available})"
    )


def image_base(path: Path, spec: SourceSpec) -> Path:
    return Path(spec.image_root) if spec.image_root else path.parent


def table_row(file: str, index: int, image: Any, captions: Any, base: Path) -> Row:
    """A row from one table record; the image value is a path, a URL or bytes."""
    caption_values, caption_problem = as_captions(captions)
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        key = hashlib.sha256(data).hexdigest()[:32]
        return Row(file, index, data, key, caption_values, caption_problem)
    location = image.strip() if isinstance(image, str) else ""
    problem = caption_problem
    if not location:
        problem = Problem("missing_image", f"row {index}: the image column is empty")
    elif not is_utf8(location):
        problem = Problem("not_utf8", f"row {index}: the image path is not UTF-8")
        location = location.encode("utf-8", "replace").decode("utf-8")
    if is_url(location) or not location:
        resolved = location
    else:
        resolved = str(base / location)  # an absolute location stays absolute
    return Row(file, index, resolved, location, caption_values, problem)


def as_captions(value: Any) -> tuple[tuple[str, ...], Problem | None]:
    """A caption cell as a tuple of strings: one string, a list of them, or UTF-8 bytes."""
    items = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    captions: list[str] = []
    for item in items:
        if isinstance(item, (bytes, bytearray)):
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError as exc:
                return (), Problem("not_utf8", f"caption is not UTF-8 (byte {exc.start})")
        if item is None:
            item = ""
        if not isinstance(item, str):  # a number or an object is no caption (repr would be)
            return (), Problem("bad_caption", f"caption is a {type(item).__name__}, not text")
        if len(item) > MAX_CAPTION_CHARS:
            return (), Problem(
                "caption_too_long", f"caption of {len(item)} characters (> {MAX_CAPTION_CHARS})"
            )
        if not is_utf8(item):
            return (), Problem("not_utf8", "caption contains bytes that are not UTF-8")
        captions.append(item)
    return tuple(captions), None


def is_utf8(text: str) -> bool:
    """False for text holding lone surrogates, i.e. undecodable bytes kept by surrogateescape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
