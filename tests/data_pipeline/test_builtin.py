"""The built-in demo dataset: deterministic, disjoint splits, hard negatives, a tokenizer that covers it."""

from __future__ import annotations

import json
import random

from data_pipeline.builtin import (
    captions,
    hard_negative,
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


def test_hard_negatives_change_one_binding_and_never_match_the_scene():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng)
        negative = hard_negative(scene, rng)
        assert negative != scene
        assert not set(captions(negative)) & set(captions(scene))
        words = lambda s: sorted(captions(s)[0].split())  # noqa: E731
        if scene.second is not None and negative.relation == scene.relation:
            assert words(negative) == words(scene)  # same words, colours swapped


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
    from data_pipeline.builtin import COLORS, Scene, Shape, binding_negatives

    a, b = Shape("circle", "red", "small"), Shape("square", "blue", "large")
    scene = Scene(a, b, "above")
    got = [captions(n)[0] for n in binding_negatives(scene)]
    assert got == [
        "a small blue circle above a large red square",
        "a large red circle above a small blue square",
        "a small red square above a large blue circle",
        "a small red circle below a large blue square",
    ]
    same_size = Scene(a, Shape("square", "blue", "small"), "left of")
    assert len(binding_negatives(same_size)) == 3  # nothing to swap in size
    single = binding_negatives(Scene(a))
    assert len(single) == len(COLORS) - 1 and Scene(a) not in single
    rows = [
        json.loads(line) for line in write_split(tmp_path, "val", 5, 32).read_text().splitlines()
    ]
    for row in rows:
        assert row["negatives"] and not set(row["negatives"]) & set(row["captions"])
