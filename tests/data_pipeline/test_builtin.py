"""The built-in demo dataset: deterministic, disjoint splits, hard negatives, a tokenizer that covers it."""

from __future__ import annotations

import json
import random

from data_pipeline.builtin import (
    NEGATIVE_TYPES,
    binding_negatives,
    captions,
    render,
    sample_scene,
    write_split,
    write_tokenizer,
)


def test_splits_are_deterministic_and_different(tmp_path):
    a = write_split(tmp_path / "a", "test", 20, 32).read_text()
    b = write_split(tmp_path / "b", "test", 20, 32).read_text()
    train = write_split(tmp_path / "a", "train", 20, 32).read_text()
    assert a == b
    assert (tmp_path / "a/images/test-000003.png").read_bytes() == (
        tmp_path / "b/images/test-000003.png"
    ).read_bytes()
    caps = lambda text: [json.loads(line)["captions"][0] for line in text.splitlines()]  # noqa: E731
    assert caps(a) != caps(train)


def test_a_table_of_an_older_format_is_written_again(tmp_path):
    table = write_split(tmp_path, "test", 6, 32)
    current = table.read_text()
    older = [json.loads(line) for line in current.splitlines()]
    for row in older:
        del row["negative_types"]
    table.write_text("".join(json.dumps(row) + "\n" for row in older))
    assert write_split(tmp_path, "test", 6, 32).read_text() == current


def test_binding_negatives_change_one_binding_of_the_kind_they_name():
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        scene = sample_scene(rng)
        for kind, negative in binding_negatives(scene):
            kinds.add(kind)
            assert negative != scene
            assert not set(captions(negative)) & set(captions(scene))
            words = lambda s: sorted(captions(s)[0].split())  # noqa: E731
            if kind.endswith("_swap"):  # the same words, two of them exchanged
                assert words(negative) == words(scene) and negative.relation == scene.relation
            elif kind == "relation_flip":
                assert (negative.first, negative.second) == (scene.first, scene.second)
            else:
                assert scene.second is None and negative.first.color != scene.first.color
    assert kinds == set(NEGATIVE_TYPES)


def test_render_draws_the_named_colours():
    rng = random.Random(1)
    scene = sample_scene(rng)
    image = render(scene, 64, rng)
    colours = {c for _, c in image.getcolors(64 * 64)}
    from data_pipeline.builtin import COLORS

    assert COLORS[scene.first.color] in colours
    if scene.second is not None:
        assert COLORS[scene.second.color] in colours


def test_tokenizer_knows_every_word(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    rng = random.Random(2)
    for _ in range(100):
        for text in captions(sample_scene(rng)):
            assert tok.unk_token_id not in tok(text)["input_ids"]
    assert tok.pad_token_id == 0 and tok.mask_token_id == 4 and len(tok) == 25


def test_binding_negatives_are_every_scene_one_binding_away(tmp_path):
    from data_pipeline.builtin import COLORS, Scene, Shape

    a, b = Shape("circle", "red", "small"), Shape("square", "blue", "large")
    scene = Scene(a, b, "above")
    got = [(kind, captions(n)[0]) for kind, n in binding_negatives(scene)]
    assert got == [
        ("colour_swap", "a small blue circle above a large red square"),
        ("size_swap", "a large red circle above a small blue square"),
        ("shape_swap", "a small red square above a large blue circle"),
        ("relation_flip", "a small red circle below a large blue square"),
    ]
    same_size = Scene(a, Shape("square", "blue", "small"), "left of")
    assert len(binding_negatives(same_size)) == 3  # nothing to swap in size
    single = binding_negatives(Scene(a))
    assert len(single) == len(COLORS) - 1 and Scene(a) not in [n for _, n in single]
    rows = [
        json.loads(line) for line in write_split(tmp_path, "val", 5, 32).read_text().splitlines()
    ]
    for row in rows:
        assert row["negatives"] and not set(row["negatives"]) & set(row["captions"])
        assert len(row["negative_types"]) == len(row["negatives"])
        assert set(row["negative_types"]) <= set(NEGATIVE_TYPES)
