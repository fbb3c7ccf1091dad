"""Input readers of `umt shard`: every format, column choice, and rows broken at read time."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.shard.sources import Problem, SourceError, SourceSpec, detect_format, read_source


def read(path: Path, **kwargs) -> list:
    return read_source(SourceSpec(path=path, **kwargs)).rows


def test_csv_resolves_relative_paths_and_keeps_urls(tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\na/1.jpg,one\nhttp://h/2.jpg,two\n/abs/3.jpg,three\n")
    rows = read(table)
    assert [r.image for r in rows] == [str(tmp_path / "a/1.jpg"), "http://h/2.jpg", "/abs/3.jpg"]
    assert [r.image_key for r in rows] == ["a/1.jpg", "http://h/2.jpg", "/abs/3.jpg"]
    assert [(r.file, r.index, r.captions) for r in rows] == [
        ("pairs.csv", 0, ("one",)),
        ("pairs.csv", 1, ("two",)),
        ("pairs.csv", 2, ("three",)),
    ]


def test_image_root_and_named_columns_in_tsv(tmp_path: Path) -> None:
    table = tmp_path / "pairs.tsv"
    table.write_text("id\tfile\ttitle\n7\tx.png\ta, b\n")
    rows = read(table, image_col="file", caption_col="title", image_root=Path("/data"))
    assert detect_format(table) == "tsv"
    assert (rows[0].image, rows[0].captions) == ("/data/x.png", ("a, b",))


def test_missing_column_is_one_clear_error(tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\n1.jpg,one\n")
    with pytest.raises(
        SourceError, match=r"no column 'url' \(--image-col\); its columns: image, caption"
    ):
        read(table, image_col="url")
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(SourceError, match="pass --image-col"):
        read(other)


def test_empty_input_is_one_clear_error(tmp_path: Path) -> None:
    table = tmp_path / "empty.csv"
    table.write_text("image,caption\n")
    with pytest.raises(SourceError, match="has no rows: nothing to shard"):
        read(table)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(SourceError, match="has no rows"):
        read(blank)


def test_missing_input_and_unknown_suffix_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        read(tmp_path / "nope.csv")
    odd = tmp_path / "pairs.xyz"
    odd.write_text("x")
    with pytest.raises(SourceError, match="pass --format-in"):
        read(odd)


def test_non_utf8_csv_cell_marks_only_its_row(tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_bytes(b"image,caption\n1.jpg,caf\xe9\n2.jpg,fine\n3.jpg,\n")
    rows = read(table)
    assert rows[0].problem == Problem("not_utf8", "caption contains bytes that are not UTF-8")
    assert (rows[1].problem, rows[1].captions) == (None, ("fine",))
    assert (rows[2].problem, rows[2].captions) == (None, ("",))  # empty: the sharder rejects it


def test_empty_image_cell_is_a_missing_image_problem(tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\n ,a cat\n")
    assert read(table)[0].problem == Problem("missing_image", "row 0: the image column is empty")


def test_jsonl_caption_lists_bad_lines_and_non_utf8(tmp_path: Path) -> None:
    lines = [
        json.dumps({"url": "https://h/1.jpg", "captions": ["a", "b"]}).encode(),
        b"{not json",
        b'{"url": "2.jpg", "captions": "caf\xe9"}',
        b"",
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"url": "3.jpg"}).encode(),
    ]
    table = tmp_path / "pairs.jsonl"
    table.write_bytes(b"\n".join(lines) + b"\n")
    rows = read(table)
    assert [(r.index, r.problem.reason if r.problem else None) for r in rows] == [
        (0, None),
        (1, "bad_record"),
        (2, "not_utf8"),
        (4, "bad_record"),
        (5, None),
    ]
    assert rows[0].captions == ("a", "b")
    assert (rows[4].image, rows[4].captions) == (str(tmp_path / "3.jpg"), ())


def test_parquet_with_paths_and_with_embedded_image_bytes(tmp_path: Path) -> None:
    by_path = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"image": ["1.jpg"], "text": ["one"]}), by_path)
    assert read(by_path)[0].image == str(tmp_path / "1.jpg")
    embedded = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"jpg": [b"\xff\xd8abc"], "caption": [b"two"]}), embedded)
    row = read(embedded, image_col="jpg")[0]
    assert (row.image, row.captions, len(row.image_key)) == (b"\xff\xd8abc", ("two",), 32)
    with pytest.raises(SourceError, match=r"no column 'url'.*its columns: jpg, caption"):
        read(embedded, image_col="url")


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_coco_groups_annotations_per_image_in_file_order(tmp_path: Path) -> None:
    coco = write_json(
        tmp_path / "captions_val2017.json",
        {
            "images": [{"id": 42, "file_name": "a.jpg"}, {"id": 7, "file_name": "b.jpg"}],
            "annotations": [
                {"image_id": 7, "id": 1, "caption": "b one"},
                {"image_id": 42, "id": 2, "caption": "a one"},
                {"image_id": 7, "id": 3, "caption": "b two"},
            ],
        },
    )
    rows = read(coco, image_root=Path("/coco/val2017"))
    assert detect_format(coco) == "coco"
    assert [(r.image, r.image_key, r.captions) for r in rows] == [
        ("/coco/val2017/a.jpg", "42", ("a one",)),
        ("/coco/val2017/b.jpg", "7", ("b one", "b two")),
    ]


def karpathy_file(tmp_path: Path) -> Path:
    def entry(name: str, split: str, cocoid: int) -> dict:
        return {
            "filepath": "val2014",
            "filename": name,
            "cocoid": cocoid,
            "split": split,
            "sentences": [{"raw": f"{name} caption", "tokens": []}],
        }

    images = [
        entry("t.jpg", "train", 1),
        entry("r.jpg", "restval", 2),
        entry("v.jpg", "val", 3),
        entry("s.jpg", "test", 4),
    ]
    return write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})


def test_karpathy_restval_counts_as_train(tmp_path: Path) -> None:
    path = karpathy_file(tmp_path)
    train = read(path, split="train")
    assert detect_format(path) == "karpathy"
    assert [(r.index, r.image_key, r.image) for r in train] == [
        (0, "1", str(tmp_path / "val2014/t.jpg")),
        (1, "2", str(tmp_path / "val2014/r.jpg")),
    ]
    assert [r.captions for r in read(path, split="test")] == [("s.jpg caption",)]


def test_folder_reads_sidecar_lines_and_reports_missing_or_non_utf8(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    (root / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.png", "sub/c.webp", "d.jpg"):
        (root / name).write_bytes(b"not read by the reader")
    (root / "b.txt").write_text("first line\n\n second \n")
    (root / "a.txt").write_text("only")
    (root / "sub/c.txt").write_bytes(b"\xff\xfe bad")
    rows = read(root)
    assert [(r.index, r.image_key) for r in rows] == [
        (0, "a.png"),
        (1, "b.jpg"),
        (2, "d.jpg"),
        (3, "sub/c.webp"),
    ]
    assert rows[1].captions == ("first line", " second ")
    assert rows[2].problem == Problem("missing_caption", "d.jpg: no sidecar caption d.txt")
    assert rows[3].problem.reason == "not_utf8"


def test_json_that_is_neither_coco_nor_karpathy_is_refused(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", {"rows": []})
    with pytest.raises(SourceError, match="neither a COCO captions file"):
        read(path)


def test_additional_columns_are_carried_in_every_table_format(tmp_path: Path) -> None:
    csv_table = tmp_path / "pairs.csv"
    csv_table.write_bytes(b"image,caption,negative,id\n1.jpg,one,not one,7\n2.jpg,two,\xff,8\n")
    rows = read(csv_table, extra_cols=("negative", "id"))
    assert rows[0].extra == (("negative", "not one"), ("id", "7"))
    assert rows[1].extra == (("negative", "\ufffd"), ("id", "8"))  # non-UTF-8 kept, replaced
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        '{"image": "1.jpg", "caption": "a", "neg": ["b", "c"]}\n{"image": "2.jpg", "caption": "d"}\n'
    )
    assert [r.extra for r in read(jsonl, extra_cols=("neg",))] == [
        (("neg", ["b", "c"]),),
        (("neg", None),),
    ]
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table({"url": ["1.jpg"], "text": ["one"], "score": [0.5], "raw": [b"x"]}), parquet
    )
    assert read(parquet, extra_cols=("score", "raw"))[0].extra == (("score", 0.5), ("raw", "x"))


def test_additional_columns_name_the_flag_when_missing_or_not_a_table(tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\n1.jpg,one\n")
    with pytest.raises(SourceError, match=r"no column 'neg' \(--save-additional-columns\)"):
        read(table, extra_cols=("neg",))
    coco = write_json(tmp_path / "captions.json", {"images": [], "annotations": []})
    with pytest.raises(SourceError, match="--save-additional-columns applies to csv/tsv/jsonl"):
        read(coco, extra_cols=("neg",))


# --- careless tables: every record accounted for ------------------------------------------------


def test_unterminated_quote_is_an_error_naming_its_line(tmp_path: Path) -> None:
    """The quote on line 5 would swallow the other 96 rows into one caption."""
    lines = ["image,caption"] + [f"{i}.jpg,caption {i}" for i in range(100)]
    lines[4] = '3.jpg,"a quote that never closes'
    table = tmp_path / "pairs.csv"
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError) as caught:
        read(table)
    message = str(caught.value)
    assert message.startswith(f"{table}: the record starting on line 5 is not valid CSV")
    assert "\n" not in message


def test_extra_delimiters_and_multiline_fields_fail_their_rows(tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text(
        "image,caption\n"
        "0.jpg,fine\n"
        "1.jpg,a cat, a dog\n"  # an unquoted comma: three fields
        "2.jpg\n"  # one field
        '3.jpg,"a quote closed\n'
        '4.jpg,two lines later"\n'
        "5.jpg,fine again\n"
    )
    rows = read(table)
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]  # five records, none merged silently
    assert [r.problem.reason if r.problem else None for r in rows] == [
        None,
        "bad_row",
        "bad_row",
        "bad_row",
        None,
    ]
    assert rows[1].problem.message == (
        "line 3: 3 fields, the header has 2 (an unquoted delimiter in a caption?)"
    )
    assert rows[3].problem.message.startswith("lines 5-6: a field spans lines")
    assert rows[4].captions == ("fine again",)


def test_non_text_and_overlong_captions_fail_their_rows(tmp_path: Path) -> None:
    table = tmp_path / "pairs.jsonl"
    records = [
        {"url": "a.jpg", "caption": {"text": "an object"}},
        {"url": "b.jpg", "caption": 42},
        {"url": "c.jpg", "caption": "x" * 20_000},
        {"url": "d.jpg", "caption": "fine"},
    ]
    table.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = read(table)
    assert [(r.problem.reason, r.problem.message) if r.problem else None for r in rows] == [
        ("bad_caption", "caption is a dict, not text"),
        ("bad_caption", "caption is a int, not text"),
        ("caption_too_long", "caption of 20000 characters (> 16384)"),
        None,
    ]
    csv_table = tmp_path / "long.csv"  # past csv's default 131072-character field limit
    csv_table.write_text(f"image,caption\na.jpg,{'y' * 200_000}\nb.jpg,fine\n")
    long, fine = read(csv_table)
    assert long.problem.reason == "caption_too_long" and fine.captions == ("fine",)


def test_a_dangling_symlink_in_a_folder_is_a_failed_row(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "real.jpg").write_bytes(b"\xff\xd8")
    (root / "real.txt").write_text("a caption")
    (root / "gone.txt").write_text("a caption")
    (root / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    rows = read(root)
    assert [(r.image_key, r.problem.reason if r.problem else None) for r in rows] == [
        ("gone.jpg", "missing_file"),
        ("real.jpg", None),
    ]
    assert "a link to" in rows[0].problem.message
