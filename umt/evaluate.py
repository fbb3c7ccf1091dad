"""Image-text retrieval evaluation: the BLIP/ALBEF protocol (R@1/5/10 both directions), ITC and
ITC top-k re-ranked by ITM, on one or several ranks with identical results.

Protocol: every image of the evaluation set is a candidate for every caption and vice versa. A
text query is right when the retrieved image is its own; an image query is right when any of its
captions is retrieved. Ties rank the lower index first. With re-ranking, the ITC top-k of each
query are scored by the ITM head; the others keep their ITC order below every scored pair.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.loader import iter_raw_samples
from data_pipeline.transforms import (
    ImageTransformConfig,
    load_tokenizer,
    normalize_images,
    transform_image,
)
from umt.checkpoint import write_json_atomic
from umt.config import tokenizer_name
from umt.distributed import all_gather_object, all_reduce, lockstep, rank, world_size

log = logging.getLogger("umt.evaluate")
KS = (1, 5, 10)


# --- metrics on a score matrix ----------------------------------------------------------------


def _ranks_of_best_positive(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """(Q,) 0-based rank of the best-ranked positive of each query row; ties: lower index first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (Q, C)
    hits = positives.gather(1, order)  # (Q, C) bool in ranked order
    return hits.float().argmax(dim=1)  # first True


def recall_at_k(
    scores_i2t: torch.Tensor,  # (I, T) image queries against text candidates
    scores_t2i: torch.Tensor,  # (T, I)
    text_to_image: torch.Tensor,  # (T,) index of each text's image
    ks: Iterable[int] = KS,
) -> dict[str, float]:
    """`i2t_r{k}`, `t2i_r{k}` (percent), `i2t_mean`, `t2i_mean` and `r_mean`."""
    n_images = scores_i2t.shape[0]
    positives_t2i = text_to_image[:, None] == torch.arange(n_images)[None, :]  # (T, I)
    rank_i2t = _ranks_of_best_positive(scores_i2t, positives_t2i.T)
    rank_t2i = _ranks_of_best_positive(scores_t2i, positives_t2i)
    out: dict[str, float] = {}
    ks = list(ks)
    for k in ks:
        out[f"i2t_r{k}"] = percent(int((rank_i2t < k).sum()), len(rank_i2t))
        out[f"t2i_r{k}"] = percent(int((rank_t2i < k).sum()), len(rank_t2i))
    out["i2t_mean"] = round(sum(out[f"i2t_r{k}"] for k in ks) / len(ks), 4)
    out["t2i_mean"] = round(sum(out[f"t2i_r{k}"] for k in ks) / len(ks), 4)
    out["r_mean"] = round((out["i2t_mean"] + out["t2i_mean"]) / 2, 4)
    return out


class EvalDataError(ValueError):
    """Evaluation data that cannot give a meaningful number; the message says what to change."""


def percent(count: int, total: int) -> float:
    """count / total in percent, to 4 decimals (counted in integers: no float32 residue)."""
    return round(100.0 * count / total, 4) if total else 0.0


def chance_recall(n_images: int, captions_per_image: float, k: int) -> dict[str, float]:
    """Expected R@k of a random ranking (percent), for reporting beside the results."""
    n_texts = n_images * captions_per_image
    t2i = 100.0 * min(1.0, k / n_images)
    # an image query succeeds if any of its c captions is among k of T texts
    c = round(captions_per_image)
    miss = math.prod((n_texts - c - j) / (n_texts - j) for j in range(min(k, int(n_texts))))
    return {f"i2t_r{k}": 100.0 * (1 - miss), f"t2i_r{k}": t2i}


# --- ITM re-ranking of the ITC top-k -------------------------------------------------------------


def rerank_topk(
    itc: torch.Tensor,  # (Q, C) ITC scores of queries against candidates
    k: int,
    score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # (queries, cands) -> (n,)
    add_itc: bool = False,
    pairs_per_call: int = 256,
) -> torch.Tensor:
    """(Q, C) scores: each query's ITC top-k re-scored by `score_pairs`; the rest below, in ITC order.

    Rows are split across ranks (row i on rank i % W) and summed, so every rank ends with the same
    matrix. `score_pairs` gets flat (query index, candidate index) lists, several rows per call;
    every rank makes the same number of calls (a rank out of rows scores a throw-away pair), since
    under ZeRO-3 each call is a collective.
    """
    q, c = itc.shape
    k = min(k, c)
    topk = itc.topk(k, dim=1).indices.cpu()  # (Q, k)
    scored = torch.zeros(q, k, dtype=torch.float64)
    rows = torch.arange(rank(), q, world_size())
    per_call = max(1, pairs_per_call // k)
    for chunk, real in lockstep(rows.split(per_call), lambda: torch.zeros(1, dtype=torch.long)):
        queries = chunk.repeat_interleave(k)
        cands = topk[chunk].flatten()
        s = score_pairs(queries, cands).double().cpu().view(len(chunk), k)
        if real:
            scored[chunk] = s + itc[chunk[:, None], topk[chunk]].double().cpu() if add_itc else s
    scored = all_reduce(scored)
    low = scored.min() - 1.0
    # Unscored pairs: strictly below every scored pair, ordered among themselves by ITC.
    out = low - (itc.max().double() - itc.double().cpu())
    out.scatter_(1, topk, scored)
    return out


# --- embedding an evaluation set ----------------------------------------------------------------


@dataclass
class EvalFeatures:
    """Every image and text of the set, in global order, on every rank."""

    image_embeds: torch.Tensor  # (I, E)
    text_embeds: torch.Tensor  # (T, E)
    image_tokens: torch.Tensor | None  # (I, P, Dv), kept only for ITM re-ranking
    text_tokens: torch.Tensor | None  # (T, L, Dt)
    text_mask: torch.Tensor | None  # (T, L)
    text_to_image: torch.Tensor  # (T,)
    image_keys: list[str]
    unreadable: int = 0  # samples left out: not read from their shard, or their image not decoded


def retrieval_report(
    features: EvalFeatures,
    logit_scale: float,
    itm_scorer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None,
    rerank_k: int = 0,
    add_itc: bool = False,
) -> dict[str, dict[str, float]]:
    """{'itc': recalls, 'itm': recalls (when rerank_k > 0)} from gathered features."""
    sim = logit_scale * features.image_embeds.double() @ features.text_embeds.double().T  # (I, T)
    report = {"itc": recall_at_k(sim, sim.T.contiguous(), features.text_to_image)}
    if rerank_k > 0:
        if itm_scorer is None or features.image_tokens is None:
            raise ValueError("ITM re-ranking needs the model's ITM head and the kept tokens")
        f = features

        def i2t(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
            return itm_scorer(f.text_tokens[texts], f.text_mask[texts], f.image_tokens[images])

        def t2i(texts: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
            return itm_scorer(f.text_tokens[texts], f.text_mask[texts], f.image_tokens[images])

        scores_i2t = rerank_topk(sim, rerank_k, i2t, add_itc)
        scores_t2i = rerank_topk(sim.T.contiguous(), rerank_k, t2i, add_itc)
        report["itm"] = recall_at_k(scores_i2t, scores_t2i, features.text_to_image)
    return report


# --- from shards ----------------------------------------------------------------------------------


@dataclass
class EvalData:
    shards: str | list[str]
    tokenizer: object  # a fast tokenizer
    image_size: int
    max_text_len: int = 64
    batch_size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    cache_dir: str | None = None  # node cache for remote shards (default: data_pipeline's)


def eval_transform(image_size: int) -> ImageTransformConfig:
    """How evaluation prepares an image: decoded in full (never at a draft scale, whatever
    data.jpeg_draft says for training), its central square resized: the tensor an export's
    processor makes from the same file opened with PIL, so evaluation scores what users get."""
    return ImageTransformConfig(image_size, train=False, draft=False)


@torch.no_grad()
def embed_eval_shards(
    model, data: EvalData, keep_tokens: bool, device: torch.device
) -> EvalFeatures:
    """Embed every image and every caption of the shards; sample i is embedded by rank i % W.

    Each image appears once with all of its captions (shards made with `umt shard --per image`).
    A sample that cannot be read or whose image cannot be decoded is left out, counted (by reason
    in rank 0's log, in total as `unreadable`). Every rank runs the
    same number of forward passes (a rank out of samples embeds a throw-away one), since under
    ZeRO-3 each forward is a collective.
    """

    transform = eval_transform(data.image_size)
    errors: Counter = Counter()
    me, w = rank(), world_size()
    dtype = next(model.parameters()).dtype
    mine: list[dict] = []
    keys: dict[int, str] = {}

    def my_batches():
        pending = []
        first_of: dict[str, str] = {}
        for i, sample in enumerate(iter_raw_samples(data.shards, errors, data.cache_dir)):
            keys[i] = sample.image_key
            # Every rank reads every sample, so every rank stops here at the same sample.
            if sample.image_key in first_of:
                raise EvalDataError(
                    f"--shards {data.shards}: image {sample.image_key} is in samples "
                    f"{first_of[sample.image_key]} and {sample.key} (shards made with --per "
                    "caption); retrieval needs each image once with all its captions: shard the "
                    "evaluation set with --per image"
                )
            first_of[sample.image_key] = sample.key
            if i % w != me:
                continue
            try:
                array = transform_image(sample.image, transform, random.Random(0))
            except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
                errors["corrupt_image"] += 1
                continue
            pending.append((i, array, sample.captions))
            if len(pending) == data.batch_size:
                yield pending
                pending = []
        if pending:
            yield pending

    def filler() -> list:
        return [(-1, np.zeros((data.image_size, data.image_size, 3), np.uint8), ("",))]

    def embed(batch: list) -> dict:
        index, arrays, captions = zip(*batch)
        pixels = normalize_images(list(arrays), data.mean, data.std, device, dtype)
        image = model.embed_image(pixels)
        texts = [c for caps in captions for c in caps]
        enc = data.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=data.max_text_len,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        text = model.embed_text(ids, mask)
        return {
            "index": list(index),
            "n_captions": [len(c) for c in captions],
            "image_embeds": image.embeds.float().cpu(),
            "text_embeds": text.embeds.float().cpu(),
            "image_tokens": image.tokens.cpu() if keep_tokens else None,
            "text_tokens": text.tokens.cpu() if keep_tokens else None,
            "text_mask": mask.cpu() if keep_tokens else None,
        }

    for batch, real in lockstep(my_batches(), filler):
        embedded = embed(batch)
        if real:
            mine.append(embedded)
    # Read errors are the same on every rank (each reads every sample); a rank decodes its own.
    corrupt = errors.pop("corrupt_image", 0)
    corrupt = int(all_reduce(torch.tensor([corrupt], dtype=torch.long)).item())
    skipped = dict(errors) | ({"corrupt_image": corrupt} if corrupt else {})
    if skipped and me == 0:
        log.warning("evaluation data: skipped %s", skipped)

    parts = [p for rank_parts in all_gather_object(mine) for p in rank_parts]
    entries = sorted(
        (idx, p, j) for p in parts for j, idx in enumerate(p["index"])
    )  # global sample order, each sample once
    image_embeds, text_embeds, text_to_image, image_keys = [], [], [], []
    image_tokens, text_tokens, text_mask = [], [], []
    for image_row, (idx, p, j) in enumerate(entries):
        start = sum(p["n_captions"][:j])
        n = p["n_captions"][j]
        image_embeds.append(p["image_embeds"][j])
        text_embeds.append(p["text_embeds"][start : start + n])
        text_to_image += [image_row] * n
        image_keys.append(keys[idx])
        if keep_tokens:
            image_tokens.append(p["image_tokens"][j])
            text_tokens.append(p["text_tokens"][start : start + n])
            text_mask.append(p["text_mask"][start : start + n])
    if not image_embeds:
        raise EvalDataError(f"--shards {data.shards}: no decodable sample (see the warning above)")
    return EvalFeatures(
        image_embeds=torch.stack(image_embeds),
        text_embeds=torch.cat(text_embeds),
        image_tokens=torch.stack(image_tokens) if keep_tokens else None,
        text_tokens=torch.cat(text_tokens) if keep_tokens else None,
        text_mask=torch.cat(text_mask) if keep_tokens else None,
        text_to_image=torch.tensor(text_to_image),
        image_keys=image_keys,
        unreadable=sum(skipped.values()),
    )


@torch.no_grad()
def evaluate_retrieval(
    model,
    data: EvalData,
    rerank_k: int = 0,
    add_itc: bool = False,
    device: torch.device | None = None,
) -> dict:
    """The full report: sizes, chance levels, ITC recalls and (with rerank_k) ITM re-ranked recalls."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = embed_eval_shards(model, data, keep_tokens=rerank_k > 0, device=device)

    def itm_scorer(text_tokens, text_mask, image_tokens) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        logits = model.itm_logits(
            text_tokens.to(device, dtype), text_mask.to(device), image_tokens.to(device, dtype)
        )
        return logits[:, 1].float()

    report = retrieval_report(features, float(model.scale()), itm_scorer, rerank_k, add_itc)
    model.train(was_training)
    n_images, n_texts = features.image_embeds.shape[0], features.text_embeds.shape[0]
    chance: dict[str, float] = {}
    for k in KS:
        chance |= chance_recall(n_images, n_texts / n_images, k)
    return {
        "images": n_images, "texts": n_texts, "unreadable": features.unreadable, "chance": chance,
        **report,
    }  # fmt: skip


def format_report(report: dict) -> str:
    """A table: one row per scorer, columns R@1/5/10 in both directions and the mean."""
    cols = [f"i2t_r{k}" for k in KS] + [f"t2i_r{k}" for k in KS] + ["r_mean"]
    head = f"{'scorer':<8}" + "".join(f"{c:>9}" for c in cols)
    left_out = f", {report['unreadable']} unreadable left out" if report.get("unreadable") else ""
    lines = [f"{report['images']} images, {report['texts']} texts{left_out}", head]
    for name in ("chance", "itc", "itm"):
        if name in report:
            row = report[name]
            lines.append(f"{name:<8}" + "".join(f"{row.get(c, float('nan')):>9.2f}" for c in cols))
    return "\n".join(lines)


def report_scalars(report: dict, set_name: str) -> dict[str, float]:
    """TensorBoard tags: `eval/<set>/i2t_r1` ... for ITC, `eval/<set>/itm_i2t_r1` ... re-ranked."""
    out = {}
    for scorer, prefix in (("itc", ""), ("itm", "itm_")):
        for key, value in report.get(scorer, {}).items():
            out[f"eval/{set_name}/{prefix}{key}"] = value
    return out


def set_name(shards: str | list[str]) -> str:
    """A short name for an evaluation set: the shard folder's name."""

    first = shards[0] if isinstance(shards, list) else shards.split(",")[0]
    path = Path(first.split("{")[0].rstrip("/"))
    return (path.name if path.suffix != ".tar" else path.parent.name) or "eval"


@torch.no_grad()
def itm_pair_scores(
    model,
    pixel_values: torch.Tensor,
    positives: list[str],
    negatives: list[str],
    tokenizer,
    max_len: int,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match probabilities of (image i, positives[i]) and (image i, negatives[i]), computed on the
    model's device in batches of `batch_size` pairs, returned as float32 on the CPU."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = len(positives)
    if n == 0:
        return torch.empty(0), torch.empty(0)
    texts, pixels = positives + negatives, torch.cat([pixel_values, pixel_values])
    out = []
    for start in range(0, 2 * n, batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            padding="longest",
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        batch = pixels[start : start + batch_size].to(device, dtype)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        out.append(model.score_pairs(ids, mask, batch).float().cpu())
    p = torch.cat(out)
    return p[:n], p[n:]


def itm_pair_metrics(pos: torch.Tensor, neg: torch.Tensor) -> dict[str, float]:
    """`accuracy`: pairs classified right (match probability > 0.5 for positives, < 0.5 for
    negatives); `preference`: images whose own caption scores above the negative. Percent."""
    n = len(pos)
    return {
        "accuracy": percent(int((pos > 0.5).sum()) + int((neg < 0.5).sum()), 2 * n),
        "preference": percent(int((pos > neg).sum()), n),
    }


# --- zero-shot classification ---------------------------------------------------------------------

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "{}")


def sample_label(captions: Iterable, lookup: dict[str, int]) -> int | None:
    """The class of a sample: the first of its captions (or label values) that equals a class
    name, ignoring case and surrounding spaces."""
    for caption in captions:
        if isinstance(caption, str) and caption.strip().lower() in lookup:
            return lookup[caption.strip().lower()]
    return None


def label_values(sample, label_field: str | None) -> tuple:
    """What may name a sample's class: json `label_field` (a string or a list of them), else
    the sample's caption and its json captions."""
    if label_field is None:
        return (sample.text, *sample.captions)
    value = sample.meta.get(label_field)
    return tuple(value) if isinstance(value, list) else (value,)


@torch.no_grad()
def zero_shot_classification(
    model,
    data: EvalData,
    classes: list[str],
    templates: Iterable[str] = DEFAULT_TEMPLATES,
    label_field: str | None = None,
) -> dict:
    """Top-1/top-5 accuracy (percent) of images against class-name prompts averaged over templates.

    A sample's label is the caption that equals a class name, ignoring case (shard a folder of
    `<class>.txt` sidecars or a table whose caption column is the class), or with `label_field`
    the value of that json field (`umt shard --save-additional-columns label`); others are
    counted as unlabelled. A sample that cannot be read or decoded is left out and counted
    (`unreadable`, by reason in the log), as in retrieval: one bad image does not stop the run (on
    several ranks it would leave the others waiting in the next forward). No labelled sample at
    all is an error (EvalDataError).
    """

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    templates = list(templates)
    prompts = [t.format(c) for c in classes for t in templates]
    enc = data.tokenizer(
        prompts,
        padding="longest",
        truncation=True,
        max_length=data.max_text_len,
        return_tensors="pt",
    )
    text = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float()
    class_embeds = torch.nn.functional.normalize(
        text.view(len(classes), len(templates), -1).mean(1), dim=-1
    )

    lookup = {c.strip().lower(): i for i, c in enumerate(classes)}
    transform = eval_transform(data.image_size)
    correct1 = correct5 = counted = unlabelled = 0
    fields: set[str] = set()  # the json fields the samples have (for an error about label_field)
    read_errors: Counter = Counter()  # the same on every rank: each reads every sample
    corrupt = 0  # images of this rank's samples that do not decode

    def my_batches():
        nonlocal unlabelled, corrupt
        arrays, labels = [], []
        samples = iter_raw_samples(data.shards, read_errors, cache_dir=data.cache_dir)
        for i, sample in enumerate(samples):
            if i % world_size() != rank():
                continue
            fields.update(sample.meta)
            label = sample_label(label_values(sample, label_field), lookup)
            if label is None:
                unlabelled += 1
                continue
            try:
                arrays.append(transform_image(sample.image, transform, random.Random(0)))
            except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
                corrupt += 1
                continue
            labels.append(label)
            if len(arrays) == data.batch_size:
                yield arrays, labels
                arrays, labels = [], []
        if arrays:
            yield arrays, labels

    def filler() -> tuple[list, list]:
        return [np.zeros((data.image_size, data.image_size, 3), np.uint8)], [0]

    # The same number of forwards on every rank (each is a collective under ZeRO-3).
    for (arrays, labels), real in lockstep(my_batches(), filler):
        pixels = normalize_images(arrays, data.mean, data.std, device, dtype)
        logits = model.encode_image(pixels).float() @ class_embeds.T
        if not real:
            continue
        top = logits.topk(min(5, len(classes)), dim=1).indices.cpu()
        target = torch.tensor(labels)
        correct1 += int((top[:, 0] == target).sum())
        correct5 += int((top == target[:, None]).any(1).sum())
        counted += len(labels)
    totals = torch.tensor([correct1, correct5, counted, unlabelled, corrupt], dtype=torch.long)
    c1, c5, n, skipped, corrupt = all_reduce(totals).tolist()
    unreadable = dict(read_errors) | ({"corrupt_image": corrupt} if corrupt else {})
    if unreadable:
        log.warning("evaluation data: skipped %s", unreadable)
    if n == 0:
        seen = sorted(set().union(*all_gather_object(sorted(fields))))
        if label_field and label_field not in seen:
            raise EvalDataError(
                f"--label-field {label_field}: none of the {skipped} samples of {data.shards} "
                f"has that json field (their fields: {', '.join(seen) or 'none'})"
            )
        where = f"its json field {label_field!r}" if label_field else "its caption"
        raise EvalDataError(
            f"--shards {data.shards}: none of its {skipped} samples has a label among the "
            f"{len(classes)} classes (a sample's label is {where}, equal to a class name "
            "ignoring case; --label-field FIELD takes it from a json field)"
        )
    return {
        "classes": len(classes),
        "samples": n,
        "unlabelled": skipped,
        "unreadable": sum(unreadable.values()),
        "top1": percent(c1, n),
        "top5": percent(c5, n),
        # A guess among the classes (the samples' labels spread evenly): top-k = k / classes.
        "chance_top1": percent(1, len(classes)),
        "chance_top5": percent(min(5, len(classes)), len(classes)),
    }


def write_eval_record(run_dir: Path, step: int, samples: int, shards, report: dict) -> Path:
    """`RUN_DIR/eval/step{N}.json`: an evaluation of the run's step-N checkpoint, which `umt export`
    puts on the model card (the trainer's periodic evaluation and the demo's write these)."""

    path = Path(run_dir) / "eval" / f"step{step}.json"
    write_json_atomic(path, {"step": step, "samples": samples, "shards": shards, "report": report})
    return path


def evaluate_run_step(model, cfg, step: int, samples: int, writer) -> dict:
    """The periodic evaluation of a training run (`eval.every_steps`): retrieval on data.eval
    with the same code as `umt eval`, its scalars to TensorBoard, its report to the log and to
    `OUTPUT_DIR/eval/step{N}.json` (for the model card). Every rank takes part."""

    data = EvalData(
        cfg.data.eval.shards,
        _tokenizer(tokenizer_name(cfg)),
        cfg.model.image.image_size,
        cfg.data.eval.max_text_len,
        cfg.train.micro_batch_size,
        cache_dir=cfg.data.cache_dir,
    )
    device = next(model.parameters()).device
    report = evaluate_retrieval(model, data, cfg.eval.itm_rerank_k, device=device)
    writer.scalars(report_scalars(report, set_name(cfg.data.eval.shards)), step)
    log.info("evaluation at step %d:\n%s", step, format_report(report))
    if rank() == 0:
        write_eval_record(Path(cfg.output_dir), step, samples, cfg.data.eval.shards, report)
    return report


@functools.cache
def _tokenizer(name: str):
    """The evaluation's tokenizer, loaded once per process."""

    return load_tokenizer(name)
