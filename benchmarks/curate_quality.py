"""Precision and recall of each curation rule at its default thresholds, on planted cases made from
scikit-learn's sample photos and the built-in scenes (tests/data_pipeline/curate_cases.py), for
several seeds; with `--model EXPORT` (the demo's: `umt demo` then `umt export`), where swapped
captions fall in the similarity ranking of the export's own scenes.

Each rule runs alone over one hash table (made once per seed: the reruns recompute nothing):
* exact dedup: positives are byte copies and PNGs of the same pixels;
* near dedup: those, JPEG re-encodes at quality 50-70, resizes to 50-80% and crops of up to 10%
  of the border; negatives are every other image, among them crops of one photo overlapping 44%
  and scenes alike in layout;
* decontamination: training copies (JPEG, resize, crop) of evaluation images.

    python benchmarks/curate_quality.py [--seeds 0 1 2 3] [--model EXPORT]

Ends with one line `SUMMARY key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.curate.options import NEAR_COLOR, NEAR_HAMMING, CurateOptions  # noqa: E402
from data_pipeline.curate.run import curate  # noqa: E402
from tests.data_pipeline.curate_cases import (  # noqa: E402
    decontamination_report,
    dedup_report,
    plant,
    plant_swapped,
    read_removed,
)

RULES = {
    "exact": ({"dedup": ("exact",)}, "exact_duplicate"),
    "near": ({"dedup": ("near",)}, "near_duplicate"),
    "decontaminate": ({}, "eval_duplicate"),
}


def seed_reports(root: Path, seed: int) -> dict[str, dict]:
    planted = plant(root / f"cases{seed}", seed=seed)
    table = root / f"table{seed}"
    reports = {}
    for rule, (options, reason) in RULES.items():
        out = root / f"{rule}{seed}"
        if rule == "decontaminate":
            options = {"decontaminate": [str(planted.eval)]}
        curate(CurateOptions([str(planted.train)], str(out), table=str(table), **options))
        removed = read_removed(out)
        if rule == "decontaminate":
            reports[rule] = decontamination_report(planted, removed)
        else:
            reports[rule] = dedup_report(planted, removed, reason)
    return reports


def swapped_in_bottom(root: Path, model: str, bottom: float = 0.2) -> tuple[int, int, int]:
    """(swapped captions in the bottom `bottom` by score, swapped captions, samples)."""
    from data_pipeline.curate.scorers import scorer_identity

    side = json.loads((Path(model) / "umt_export.json").read_text())["image"]["image_size"]
    scorer_identity(model)  # a bad --model is named before anything is drawn
    swapped = plant_swapped(root / "scenes", count=200, swapped=20, side=side)
    out = root / "scored"
    curate(CurateOptions([str(root / "scenes")], str(out), model=model, keep_top=1 - bottom))
    removed = {r["key"] for r in read_removed(out)}
    return len(removed & swapped), len(swapped), 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--model", help="a UMT export (the demo's) for the swapped-caption test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="umt-curate-quality-") as tmp:
        reports = {seed: seed_reports(Path(tmp), seed) for seed in args.seeds}
        swapped = swapped_in_bottom(Path(tmp), args.model) if args.model else None
    print(f"defaults: --near-hamming {NEAR_HAMMING} --near-color {NEAR_COLOR}")
    print("rule           seed  removed  precision  recall  recall by kind")
    pooled = {}
    for rule in RULES:
        for seed, by_rule in reports.items():
            r = by_rule[rule]
            kinds = " ".join(f"{k}={v:.3f}" for k, v in r["per_kind"].items())
            print(f"{rule:<14} {seed:>4} {r['removed']:>8} {r['precision']:>10.4f} "
                  f"{r['recall']:>7.4f}  {kinds}")  # fmt: skip
        right, removed, expected = (
            sum(by_rule[rule][k] for by_rule in reports.values())
            for k in ("right", "removed", "expected")
        )
        pooled[rule] = (right / removed if removed else 1.0, right / expected)
    for rule, (precision, recall) in pooled.items():
        print(f"{rule:<14} all  precision {precision:.4f} recall {recall:.4f}")
    line = " ".join(
        f"{rule}_precision={p:.4f} {rule}_recall={r:.4f}" for rule, (p, r) in pooled.items()
    )
    if swapped:
        hit, total, samples = swapped
        print(f"swapped captions in the bottom 20% by similarity ({samples} scenes, "
              f"{args.model}): {hit} of {total}")  # fmt: skip
        line += f" swapped_in_bottom_20pct={hit / total:.3f}"
    print(f"SUMMARY seeds={len(args.seeds)} {line}")


if __name__ == "__main__":
    main()
