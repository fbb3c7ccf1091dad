"""`umt demo [--out DIR] [--ranks N] [--steps S]`: the whole loop on a CPU on the built-in dataset.

Generate the dataset -> shard it with `umt shard` -> train `configs/demo_cpu.yaml` on N ranks
(DeepSpeed ZeRO-2, started through torch's elastic launcher) -> evaluate retrieval and ITM on
hard negatives of each kind -> results.json, retrieval_examples.png and the commands to go on.
Running it again with the same --out resumes instead of starting over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from umt.shipped import SOURCE_TREE, config_path

SPLITS = {"train": 3000, "val": 200, "test": 300}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="umt demo", description=__doc__)
    parser.add_argument(
        "--out", default="runs/demo", help="everything goes here (default: runs/demo)"
    )
    parser.add_argument(
        "--ranks", type=int, default=min(2, os.cpu_count() or 1), help="training processes"
    )
    parser.add_argument(
        "--config",
        default="demo_cpu",
        help="the shipped demo config to train: demo_cpu (default) or demo_multiway_cpu",
    )
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    parser.add_argument("--train-size", type=int, default=SPLITS["train"], help="training images")
    parser.add_argument("--test-size", type=int, default=SPLITS["test"], help="test images")
    parser.add_argument("overrides", nargs="*", help="extra config overrides key.path=value")
    return parser.parse_args(argv)


def step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def make_data(out: Path, sizes: dict[str, int], side: int, ranks: int) -> None:
    from data_pipeline.builtin import write_split, write_tokenizer
    from data_pipeline.shard import OtherRunError, ShardOptions, shard_dataset

    for split, count in sizes.items():
        table = write_split(out / "data", split, count, side)
        options = ShardOptions(
            image_col="image",
            caption_col="captions",
            save_additional_columns=("negatives",),  # hard negatives for ITM (data.train.negatives)
            per="image",
            resize="none",
            image_format="png",
            skip_reencode=True,
            # Epoch mode gives every rank x worker its own shards: at least 4 shards per rank.
            maxcount=max(8, -(-count // (4 * ranks))),
            seed=0 if split == "train" else None,
        )
        try:
            summary = shard_dataset(table, out / "shards" / split, options, progress=True)
        except OtherRunError as exc:
            raise SystemExit(
                f"umt demo: {exc.out} was written from other data or options (another demo "
                f"version, --ranks, --train-size or --test-size: {'; '.join(exc.differences)}); "
                f"run with those of the first run, remove {out}, or choose another --out"
            ) from None
        print(f"  {split}: {summary.line()}")
    write_tokenizer(out / "tokenizer")


def train(out: Path, ranks: int, overrides: list[str], config: str = "demo_cpu") -> None:
    from umt.distributed import _free_port

    cmd = [
        sys.executable, "-m", "launch.torchrun", f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "launch.train", "--config", str(config_path(config)), "--resume", "auto",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if (SOURCE_TREE / "pyproject.toml").is_file():  # run from a checkout: its code, not another
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_TREE), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=out, env=env)
    if proc.returncode != 0:
        raise SystemExit(
            f"umt demo: training failed (exit {proc.returncode}); run the demo again to resume"
        )


def evaluate(out: Path, cfg) -> tuple[dict, dict]:
    import torch

    from data_pipeline.loader import iter_raw_samples
    from data_pipeline.transforms import ImageTransformConfig, normalize_images, transform_image
    from umt import checkpoint
    from umt.evaluate import EvalData, evaluate_retrieval, format_report, write_eval_record
    from umt.export import load_model

    torch.manual_seed(0)
    model, processor = load_model(out / "train" / "checkpoints")
    shards = str(out / "shards" / "test")
    data = EvalData(shards, processor.tokenizer, processor.image_size, processor.max_length, 64)
    report = evaluate_retrieval(model, data, rerank_k=16)
    print(format_report(report))
    # Where `umt export` finds it for the model card, as the trainer's own evaluations.
    ref = checkpoint.find_latest(out / "train" / "checkpoints")
    samples = checkpoint.read_meta(ref).get("samples", 0)
    write_eval_record(out / "train", ref.step, samples, shards, report)
    rows = {}
    for line in (out / "data" / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["image"]] = row
    transform = ImageTransformConfig(image_size=processor.image_size, train=False)
    import random

    samples = list(iter_raw_samples(shards))
    pixels = normalize_images(
        [transform_image(s.image, transform, random.Random(0)) for s in samples],
        (0.5,) * 3,
        (0.5,) * 3,
    )
    pos = [rows[s.image_key]["captions"][0] for s in samples]
    itm = itm_by_negative_type(model, processor, pixels, pos, [rows[s.image_key] for s in samples])
    print(format_itm(itm))
    examples(out, model, processor, samples, pixels, pos)
    return report, itm


def itm_by_negative_type(model, processor, pixels, positives: list[str], rows: list[dict]) -> dict:
    """ITM accuracy and preference of each image's caption against every caption one binding away,
    in all, for the attribute swaps (colour, size or shape exchanged between the two shapes) and
    per kind of negative. Chance is 50% for both figures."""
    import torch

    from data_pipeline.builtin import NEGATIVE_TYPES
    from umt.evaluate import itm_pair_metrics, itm_pair_scores

    index, neg, kinds = [], [], []
    for i, row in enumerate(rows):
        for caption, kind in zip(row["negatives"], row["negative_types"], strict=True):
            index.append(i)
            neg.append(caption)
            kinds.append(kind)
    pos_p, neg_p = itm_pair_scores(
        model,
        pixels[torch.tensor(index, dtype=torch.long)],
        [positives[i] for i in index],
        neg,
        processor.tokenizer,
        processor.max_length,
    )

    def score(keep) -> dict:
        idx = torch.tensor([j for j, kind in enumerate(kinds) if keep(kind)], dtype=torch.long)
        if not len(idx):
            return {"accuracy": None, "preference": None, "pairs": 0}
        return {**itm_pair_metrics(pos_p[idx], neg_p[idx]), "pairs": len(idx)}

    return {
        **score(lambda kind: True),
        "chance": 50.0,
        "attribute_swaps": score(lambda kind: kind.endswith("_swap")),
        "by_type": {t: score(lambda kind, t=t: kind == t) for t in NEGATIVE_TYPES},
    }


def format_itm(itm: dict) -> str:
    """The ITM table: accuracy and preference per kind of negative."""
    lines = [
        f"ITM on hard negatives (chance {itm['chance']:.0f}%)",
        f"{'negatives':<16} {'pairs':>6} {'accuracy':>9} {'prefers own':>12}",
    ]
    named = [("all", itm), ("attribute swaps", itm["attribute_swaps"])]
    named += [(kind.replace("_", " "), r) for kind, r in itm["by_type"].items()]
    for name, r in named:
        if r["pairs"]:
            lines.append(
                f"{name:<16} {r['pairs']:>6} {r['accuracy']:>8.1f}% {r['preference']:>11.1f}%"
            )
    return "\n".join(lines)


# How README names the kinds of negatives that are not attribute swaps.
KIND_NAMES = {
    "recolour": "one shape recoloured",
    "relation_flip": 'relation flipped ("above" for "below")',
}


def readme_figures(results: dict) -> str:
    """README's demo figures, written from a `results.json` (docs/demo_results.json holds the run
    they come from; a test keeps README and that file in step)."""

    def pct(value: float) -> str:
        return f"{value:.1f}%".replace(".0%", "%") if value == 100 else f"{value:.1f}%"

    chance = results["chance"]["i2t_r1"]
    itc, itm = results["retrieval_itc"], results["retrieval_itm_rerank"]
    hard = results["itm_hard_negatives"]
    minutes = results["wall_time_s"] / 60
    lines = [
        f"Measured: {results['steps']} steps on {results['ranks']} CPU ranks in {minutes:.1f} min, "
        f"{results['images']} test images and {results['texts']} captions:",
        "",
        "| | R@1 image→text | R@1 text→image | chance |",
        "| --- | --- | --- | --- |",
        f"| ITC | {pct(itc['i2t_r1'])} | {pct(itc['t2i_r1'])} | {chance:.2f}% |",
        f"| ITC top-16 re-ranked by ITM | {pct(itm['i2t_r1'])} | {pct(itm['t2i_r1'])} | {chance:.2f}% |",
        "",
        f"| ITM negatives (chance {hard['chance']:.0f}%) | pairs | accuracy | own caption preferred |",
        "| --- | --- | --- | --- |",
    ]
    rows = [
        ("all", hard),
        ("attribute swaps (colour, size or shape exchanged)", hard["attribute_swaps"]),
    ]
    rows += [(KIND_NAMES[kind], hard["by_type"][kind]) for kind in KIND_NAMES]
    for name, r in rows:
        lines.append(f"| {name} | {r['pairs']} | {pct(r['accuracy'])} | {pct(r['preference'])} |")
    return "\n".join(lines)


def examples(
    out: Path, model, processor, samples, pixels, captions: list[str], queries: int = 4
) -> None:
    """retrieval_examples.png: text queries with their top-5 images by ITC, the query's own image
    outlined green and the others red, under a legend that says so."""
    import io

    import torch
    from PIL import Image, ImageDraw

    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        enc = processor.text(captions[:queries])
        text_embeds = model.encode_text(enc["input_ids"], enc["attention_mask"])
    top = (text_embeds @ image_embeds.T).topk(5, dim=1).indices
    thumb, pad, label, legend = 96, 6, 22, 36
    canvas = Image.new(
        "RGB", (5 * (thumb + pad) + pad, legend + queries * (thumb + label + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (pad, pad), "Each query's top 5 test images by ITC (cosine similarity),", fill="black"
    )
    draw.text((pad, pad + 14), "best first. Green: its own image; red: another.", fill="black")
    for q in range(queries):
        y = legend + pad + q * (thumb + label + pad)
        draw.text((pad, y), f"query: {captions[q]}", fill="black")
        for r, idx in enumerate(top[q].tolist()):
            x = pad + r * (thumb + pad)
            img = Image.open(io.BytesIO(samples[idx].image)).convert("RGB").resize((thumb, thumb))
            canvas.paste(img, (x, y + label))
            color = "lime" if idx == q else "red"
            draw.rectangle(
                (x - 2, y + label - 2, x + thumb + 1, y + label + thumb + 1), outline=color, width=3
            )
    canvas.save(out / "retrieval_examples.png")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    from data_pipeline.builtin import tokenizer_vocab
    from umt.config import load_config

    overrides = [
        f"output_dir={out / 'train'}",
        f"data.tokenizer={out / 'tokenizer'}",
        f"data.train.shards={out / 'shards' / 'train'}",
        f"data.eval.shards={out / 'shards' / 'test'}",
        f"model.text.vocab_size={len(tokenizer_vocab())}",  # the demo tokenizer's own size
        f"model.text.mask_token_id={tokenizer_vocab().index('[MASK]')}",
        *([f"train.steps={args.steps}"] if args.steps else []),
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    step(1, f"built-in dataset and shards in {out}")
    make_data(
        out,
        {"train": args.train_size, "val": SPLITS["val"], "test": args.test_size},
        cfg.model.image.image_size,
        args.ranks,
    )
    step(2, f"training {cfg.train.steps} steps on {args.ranks} rank(s), ZeRO-{cfg.zero.stage}")
    train(out, args.ranks, overrides, args.config)
    step(3, "evaluating on the test split")
    report, itm = evaluate(out, cfg)
    step(4, "writing results")
    results = {
        "retrieval_itc": report["itc"],
        "retrieval_itm_rerank": report.get("itm"),
        "chance": report["chance"],
        "images": report["images"],
        "texts": report["texts"],
        "itm_hard_negatives": itm,
        "steps": cfg.train.steps,
        "ranks": args.ranks,
        "wall_time_s": round(time.time() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    step(5, "done")
    ckpt = out / "train" / "checkpoints"
    print(
        f"""
results:            {out / "results.json"}
examples:           {out / "retrieval_examples.png"}
TensorBoard:        tensorboard --logdir {out / "train" / "tensorboard"}
checkpoints:        {ckpt}
resume training:    umt train --resume {out / "train"} --nproc-per-node {args.ranks} train.steps={2 * cfg.train.steps}
export:             umt export {ckpt} {out / "train" / "export"}
evaluate:           umt eval --model {ckpt} --shards {out / "shards" / "test"} --itm-rerank 16 --out {out / "eval.json"}
"""
    )
    return 0
