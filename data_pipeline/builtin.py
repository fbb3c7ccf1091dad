"""The built-in demo dataset: procedurally drawn scenes of one or two shapes with captions.

"a small red circle above a large blue square". Solving it needs both objectives: ITC learns
which colours and shapes are present; telling a scene from its attribute-swapped twin ("a small
blue circle above a large red square") needs the fused tokens of ITM. Each sample carries such a
caption one binding away (swapped colours, sizes or shapes, a flipped relation, a recolour),
labelled with its kind, so the demo can measure exactly that, kind by kind. Splits are disjoint by seed.
Written as PNG files plus one JSONL per split, so the demo shards them with `umt shard` like any
user dataset.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 70, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 175),
    "white": (245, 245, 245),
}
SIZES = {"small": 0.16, "large": 0.28}  # half-side as a fraction of the image side
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str

    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    first: Shape
    second: Shape | None = None
    relation: str | None = None  # first <relation> second


def sample_scene(rng: random.Random) -> Scene:
    def shape() -> Shape:
        return Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)))

    first = shape()
    if rng.random() < 0.25:
        return Scene(first)
    second = shape()
    while second.color == first.color:  # distinct colours: swapping them changes the scene
        second = replace(second, color=rng.choice(list(COLORS)))
    return Scene(first, second, rng.choice(list(RELATIONS)))


def captions(scene: Scene) -> list[str]:
    """Every phrasing of the scene (two or three), in a fixed order."""
    a = scene.first.phrase()
    if scene.second is None:
        return [f"a {a}", f"there is a {a}", f"a picture of a {a}"]
    b = scene.second.phrase()
    rel, inverse = scene.relation, RELATIONS[scene.relation]
    return [f"a {a} {rel} a {b}", f"a {b} {inverse} a {a}", f"there is a {a} {rel} a {b}"]


NEGATIVE_TYPES = ("recolour", "colour_swap", "size_swap", "shape_swap", "relation_flip")
"""The kinds of binding negative; the swaps exchange an attribute between the two shapes."""


def binding_negatives(scene: Scene) -> list[tuple[str, Scene]]:
    """Every scene one binding away with its kind (`NEGATIVE_TYPES`), in a fixed order: for two
    shapes their colours, sizes or shapes swapped (where they differ) and the relation flipped;
    for one shape each other colour."""
    if scene.second is None:
        return [
            ("recolour", replace(scene, first=replace(scene.first, color=c)))
            for c in COLORS
            if c != scene.first.color
        ]
    a, b = scene.first, scene.second
    out = []
    for attribute in ("color", "size", "shape"):
        if getattr(a, attribute) != getattr(b, attribute):
            swapped_a = replace(a, **{attribute: getattr(b, attribute)})
            swapped_b = replace(b, **{attribute: getattr(a, attribute)})
            kind = f"{'colour' if attribute == 'color' else attribute}_swap"
            out.append((kind, replace(scene, first=swapped_a, second=swapped_b)))
    out.append(("relation_flip", replace(scene, relation=RELATIONS[scene.relation])))
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, cx: float, cy: float, side: int) -> None:
    r = SIZES[s.size] * side
    box = (cx - r, cy - r, cx + r, cy + r)
    color = COLORS[s.color]
    if s.shape == "circle":
        draw.ellipse(box, fill=color)
    elif s.shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def render(scene: Scene, side: int, rng: random.Random) -> Image.Image:
    """Draw the scene on a grey background with jittered positions."""
    background = tuple(int(60 + rng.random() * 40) for _ in range(3))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)

    def jitter() -> float:
        return (rng.random() - 0.5) * 0.12 * side

    if scene.second is None:
        _draw_shape(draw, scene.first, side / 2 + jitter(), side / 2 + jitter(), side)
        return image
    near, far = 0.27 * side, 0.73 * side
    mid = side / 2
    first_at, second_at = {
        "left of": ((near, mid), (far, mid)),
        "right of": ((far, mid), (near, mid)),
        "above": ((mid, near), (mid, far)),
        "below": ((mid, far), (mid, near)),
    }[scene.relation]
    _draw_shape(draw, scene.first, first_at[0] + jitter(), first_at[1] + jitter(), side)
    _draw_shape(draw, scene.second, second_at[0] + jitter(), second_at[1] + jitter(), side)
    return image


def write_split(out: Path, split: str, count: int, side: int, seed: int = 0) -> Path:
    """`out/images/{split}-NNNNNN.png` and `out/{split}.jsonl`; idempotent.

    Each row: image, captions, `negatives` (every caption one binding away, phrased like the
    first caption: hard negatives for training, see `data.train.negatives`, and what the demo
    evaluates ITM on) and `negative_types` (their kinds, `NEGATIVE_TYPES`). A table of another
    size or an older format (no `negative_types`) is written again, from the seed.
    """
    rng = random.Random(seed * 1000 + SPLIT_SEEDS[split])
    (out / "images").mkdir(parents=True, exist_ok=True)
    table = out / f"{split}.jsonl"
    if table.is_file():
        lines = table.read_text().splitlines()
        if len(lines) == count and (not lines or "negative_types" in json.loads(lines[0])):
            return table
    rows = []
    for i in range(count):
        scene = sample_scene(rng)
        name = f"images/{split}-{i:06d}.png"
        render(scene, side, rng).save(out / name, optimize=False)
        negatives = binding_negatives(scene)
        rows.append(
            {
                "image": name,
                "captions": captions(scene),
                "negatives": [captions(n)[0] for _, n in negatives],
                "negative_types": [kind for kind, _ in negatives],
            }
        )
    tmp = table.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(table)
    return table


def vocabulary() -> list[str]:
    """Every word the captions can use."""
    words = {"a", "there", "is", "picture", "of", "left", "right", "above", "below"}
    words |= set(SHAPES) | set(COLORS) | set(SIZES)
    return sorted(words)


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tokenizer_vocab() -> list[str]:
    """The demo tokenizer's vocabulary in id order: special tokens, then every caption word."""
    return [*SPECIAL_TOKENS, *vocabulary()]


def write_tokenizer(out: Path) -> Path:
    """A BERT WordPiece tokenizer over the demo vocabulary ([PAD]=0 ... [MASK]), saved to `out`."""
    import transformers
    from transformers import BertTokenizerFast

    if (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokens = tokenizer_vocab()
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n")
    if int(transformers.__version__.split(".")[0]) >= 5:  # the vocabulary argument was renamed
        tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    else:
        tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
    tokenizer.save_pretrained(str(out))
    return out
