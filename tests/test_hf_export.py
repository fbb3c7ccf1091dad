"""Exports in the Hugging Face ecosystem: `umt export` writes a `save_pretrained` folder that
`AutoModel`/`AutoTokenizer` load (after `import umt`), `save_pretrained` round-trips bit for bit,
`device_map` loading goes through accelerate, and the model card tells the run's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import REPO, write_tiny_towers
from tests.test_daily_jobs import TINY, umt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """4 steps on real shards from pretrained towers of non-default settings (local folders),
    checkpoints and retrieval evaluation at steps 2 and 4."""
    from data_pipeline.builtin import write_split, write_tokenizer
    from data_pipeline.shard import ShardOptions, shard_dataset

    root = tmp_path_factory.mktemp("hf")
    table = write_split(root / "data", "train", 24, 32)
    shard_dataset(table, root / "shards", ShardOptions(resize="none", maxcount=12))
    write_tokenizer(root / "tokenizer")
    bert, vit = write_tiny_towers(root / "towers")
    umt(
        "train", f"output_dir={root / 'run'}", f"data.train.shards={root / 'shards'}",
        f"data.eval.shards={root / 'shards'}", f"data.tokenizer={root / 'tokenizer'}",
        "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=5", "eval.every_steps=2",
        "model.mlm=true", *TINY, f"model.text.pretrained={bert}", f"model.image.pretrained={vit}",
    )  # fmt: skip
    return root / "run"


@pytest.fixture(scope="module")
def export(run: Path) -> Path:
    umt("export", str(run / "checkpoints"), str(run.parent / "export"))
    return run.parent / "export"


def inputs(image_size: int = 32):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 512, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    pixels = torch.randn(3, 3, image_size, image_size, generator=gen)
    return ids, mask, pixels


def outputs(model, ids, mask, pixels) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model.encode_text(ids, mask),
            model.encode_image(pixels),
            model.score_pairs(ids, mask, pixels),
            model.scale(),
        ]


def test_an_export_loads_with_automodel_and_equals_umt_load(export):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    import umt

    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in export.iterdir()
    }
    assert AutoConfig.from_pretrained(export).model_type == "umt"
    hf, info = AutoModel.from_pretrained(export, output_loading_info=True)
    assert type(hf).__name__ == "UMTModel" and not hf.training
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    model, processor = umt.load(export)
    ids, mask, pixels = inputs()
    for ours, theirs in zip(outputs(model, ids, mask, pixels), outputs(hf.umt, ids, mask, pixels)):
        assert torch.equal(ours, theirs)
    with torch.no_grad():
        out = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    assert torch.equal(out.image_embeds, hf.get_image_features(pixels))
    expected = model.scale() * model.encode_image(pixels) @ model.encode_text(ids, mask).T
    assert torch.equal(out.logits_per_image, expected.detach())
    tokenizer = AutoTokenizer.from_pretrained(export)
    text = ["a red circle", "two blue squares on grey"]
    assert torch.equal(
        tokenizer(text, padding="longest", return_tensors="pt")["input_ids"],
        processor(text=text)["input_ids"],
    )
    # `import umt` registered the processors too: UMT's own code, no trust_remote_code.
    from transformers import AutoProcessor

    hf_processor = AutoProcessor.from_pretrained(export)
    assert type(hf_processor).__module__ == "umt.model.hf_processing"
    images = [Image.open(path) for path in write_test_images(export.parent / "images_local")]
    ours, theirs = processor(images=images, text=text), hf_processor(images=images, text=text)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def write_test_images(folder: Path) -> list[Path]:
    """PNGs of every kind the pixel conversion treats apart: RGB, RGBA (alpha over white),
    greyscale, 16-bit greyscale (scaled, not clipped), palette; sizes that crop both ways."""
    import numpy as np

    folder.mkdir(exist_ok=True)
    gen = np.random.default_rng(0)
    images = {
        "rgb": Image.fromarray(gen.integers(0, 256, (30, 47, 3), dtype=np.uint8)),
        "rgba": Image.fromarray(gen.integers(0, 256, (41, 29, 4), dtype=np.uint8)),
        "grey": Image.fromarray(gen.integers(0, 256, (64, 64), dtype=np.uint8)),
        "grey16": Image.fromarray(gen.integers(0, 65536, (33, 50), dtype=np.uint16)),
        "palette": Image.new("RGB", (50, 20), (30, 200, 90)).convert("P"),
    }
    paths = []
    for name, image in images.items():
        image.save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


REMOTE_SCRIPT = """
import importlib.util, sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModel, AutoProcessor

export, work = sys.argv[1], Path(sys.argv[2])
assert importlib.util.find_spec("umt") is None, "umt is installed here"
model = AutoModel.from_pretrained(export, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained(export, trust_remote_code=True)
inputs = load_file(work / "inputs.safetensors")
ids, mask, pixels = inputs["ids"], inputs["mask"], inputs["pixels"]
images = [Image.open(work / "images" / name) for name in sys.argv[3:]]
processed = processor(images=images, text=["a red circle", "two blue squares on grey"])
with torch.no_grad():
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    got = {
        "text": model.umt.encode_text(ids, mask), "image": model.umt.encode_image(pixels),
        "pairs": model.umt.score_pairs(ids, mask, pixels), "scale": model.umt.scale(),
        "logits": out.logits_per_image, "image_processor": image_processor(images)["pixel_values"],
        **processed,
    }
save_file({k: v.contiguous() for k, v in got.items()}, str(work / "outputs.safetensors"))
print(type(model).__module__, sorted({m.split(".")[0] for m in sys.modules} & {"umt", "deepspeed"}))
"""


def test_an_export_loads_where_umt_is_not_installed(export, tmp_path):
    """In a venv holding only torch, transformers, safetensors and pillow (and what they need),
    `trust_remote_code=True` runs the code the export carries: AutoModel's outputs, and
    AutoProcessor's and AutoImageProcessor's tensors, equal `umt.load`'s bit for bit."""
    from safetensors.torch import load_file, save_file

    import umt
    from tests.side_venvs import linked_venv

    python = linked_venv(tmp_path / "venv", ["torch", "transformers", "safetensors", "pillow"])
    paths = write_test_images(tmp_path / "images")
    ids, mask, pixels = inputs()
    save_file({"ids": ids, "mask": mask, "pixels": pixels}, str(tmp_path / "inputs.safetensors"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UMT_DEBUG")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run(
        [str(python), "-c", REMOTE_SCRIPT, str(export), str(tmp_path), *(p.name for p in paths)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The export's own code ran, and nothing of UMT or DeepSpeed was imported.
    assert proc.stdout.startswith("transformers_modules.") and proc.stdout.rstrip().endswith(
        "[]"
    ), proc.stdout
    got = load_file(tmp_path / "outputs.safetensors")
    model, processor = umt.load(export)
    text, image, pairs, scale = outputs(model, ids, mask, pixels)
    with torch.no_grad():
        logits = model.scale() * model.encode_image(pixels) @ model.encode_text(ids, mask).T
    images = [Image.open(p) for p in paths]
    want = {
        "text": text, "image": image, "pairs": pairs, "scale": scale, "logits": logits,
        "image_processor": processor(images=images)["pixel_values"],
        **processor(images=images, text=["a red circle", "two blue squares on grey"]),
    }  # fmt: skip
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key].reshape(got[key].shape)), key


def test_pretrained_towers_come_back_exactly_from_the_export_and_the_checkpoint(run, export):
    """The towers' own settings (relu / gelu_new, norm epsilons, one token type, no QKV bias)
    travel with the run: export -> umt.load, AutoModel, and checkpoint -> evaluation's loader
    equal the trained model (its towers built from the pretrained folders) bit for bit."""
    from transformers import AutoModel

    import umt
    from umt import checkpoint
    from umt.export import consolidate, load_model
    from umt.model import build_model, model_config_from_dict

    ref = checkpoint.resolve(str(run / "checkpoints"), run / "checkpoints", flag="checkpoint")
    trained_cfg = model_config_from_dict(checkpoint.read_meta(ref)["config"]["model"])
    assert trained_cfg.text.architecture["hidden_act"] == "relu"
    assert trained_cfg.image.architecture["layer_norm_eps"] == 1e-6
    trained = build_model(trained_cfg, log_table=False)  # towers from the folders again
    trained.load_state_dict(consolidate(ref), strict=True)
    trained.eval()
    rebuilt = {
        "umt.load": umt.load(export)[0],
        "AutoModel": AutoModel.from_pretrained(export).umt,
        "checkpoint": load_model(run / "checkpoints")[0],
    }
    ids, mask, pixels = inputs()
    want = outputs(trained, ids, mask, pixels)
    for name, model in rebuilt.items():
        got = outputs(model, ids, mask, pixels)
        assert all(torch.equal(a, b) for a, b in zip(want, got)), name


def test_deepspeeds_zero_to_fp32_reads_the_checkpoint_root_and_equals_the_export(
    run, export, tmp_path
):
    """DeepSpeed's own `zero_to_fp32.py` (copied into `checkpoints/` by DeepSpeed) consolidates
    the newest checkpoint from the root, another with `-t stepN`, and refuses a step folder
    (it looks for `latest` in the folder it is given)."""
    from safetensors.torch import load_file

    from umt import checkpoint
    from umt.export import consolidate

    root = run / "checkpoints"

    def zero_to_fp32(folder: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(root / "zero_to_fp32.py"), str(folder), str(out),
             "--safe_serialization", *args],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    proc = zero_to_fp32(root, tmp_path / "newest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(tmp_path / "newest" / "model.safetensors")
    ours = {k.removeprefix("umt."): v for k, v in load_file(export / "model.safetensors").items()}
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    proc = zero_to_fp32(root, tmp_path / "step2", "-t", "step2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step2 = consolidate(checkpoint.resolve(str(root / "step2"), root / "step2", flag="ckpt"))
    theirs = load_file(tmp_path / "step2" / "model.safetensors")
    assert theirs.keys() == step2.keys() and all(torch.equal(theirs[k], step2[k]) for k in step2)
    proc = zero_to_fp32(root / "step4", tmp_path / "refused")
    assert proc.returncode != 0 and "Unable to find 'latest' file" in proc.stderr


def test_save_pretrained_round_trips_bit_for_bit(export, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    first = AutoModel.from_pretrained(export)
    first.save_pretrained(tmp_path / "again")
    exported, saved = (
        load_file(export / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in exported)
    second = AutoModel.from_pretrained(tmp_path / "again")
    ids, mask, pixels = inputs()
    for a, b in zip(outputs(first.umt, ids, mask, pixels), outputs(second.umt, ids, mask, pixels)):
        assert torch.equal(a, b)
    saved_config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (
        saved_config["umt_model"] == json.loads((export / "config.json").read_text())["umt_model"]
    )
    # It carries its code too, as the export does: it loads with trust_remote_code elsewhere.
    assert saved_config["auto_map"] == {
        "AutoConfig": "hf_config.UMTConfig",
        "AutoModel": "hf_model.UMTModel",
    }
    code = {p.name for p in (tmp_path / "again").glob("*.py")}
    assert code == {p.name for p in export.glob("*.py")} - {"hf_processing.py", "pixels.py"}


def test_device_map_loading_through_accelerate_gives_the_same_outputs(export, tmp_path):
    """A model bigger than the memory given: accelerate places what fits and offloads the rest
    to disk, and the outputs do not change."""
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(export)
    half = sum(p.numel() * p.element_size() for p in reference.parameters()) // 2
    mapped = AutoModel.from_pretrained(
        export, device_map="auto", max_memory={"cpu": half}, offload_folder=tmp_path
    )
    assert set(mapped.hf_device_map.values()) == {"cpu", "disk"}
    ids, mask, pixels = inputs()
    for a, b in zip(
        outputs(reference.umt, ids, mask, pixels), outputs(mapped.umt, ids, mask, pixels)
    ):
        assert torch.equal(a, b)


def test_import_umt_registers_the_auto_classes_without_importing_transformers(export):
    script = (
        "import sys, umt\n"
        "assert 'transformers' not in sys.modules, 'import umt pulled in transformers'\n"
        "from transformers import AutoModel\n"
        f"print(type(AutoModel.from_pretrained({str(export)!r})).__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "UMTModel"


def test_the_model_card_tells_the_runs_sizes_data_steps_and_last_evaluation(run, export, tmp_path):
    from data_pipeline.loader.dataset import resolve_dataset

    card = (export / "README.md").read_text()
    meta = json.loads((run / "checkpoints" / "step4" / "umt_meta.json").read_text())
    config = meta["config"]
    dataset = resolve_dataset(config["data"]["train"]["shards"], resampled=False)
    assert card.startswith("---\nlibrary_name: umt\n")
    assert "(step 4)" in card and "- steps: 4 of 4 configured" in card
    assert f"- samples seen: {meta['samples']:,}" in card and meta["samples"] == 4 * 4
    assert f"`{dataset.digest()}`" in card
    assert f"samples per epoch: {dataset.total_samples:,} in {len(dataset.shards)} shards" in card
    (source,) = dataset.sources  # its samples, shards, mixture, per epoch and samples seen
    assert (
        f"| {source.name} | {source.total_samples:,} | {len(source.shards)} | x1 | "
        f"{source.total_samples:,} | {meta['samples']:,} |"
    ) in card
    from umt import load

    model, _ = load(export)
    total = sum(p.numel() for p in model.parameters())
    assert f"| total | {total:,} (" in card
    report = json.loads((run / "eval" / "step4.json").read_text())["report"]
    assert "Retrieval at step 4" in card
    assert f"| itc | {report['itc']['i2t_r1']:.2f} | {report['itc']['i2t_r5']:.2f} |" in card
    # An export of an earlier checkpoint reports the evaluation of its own step, not a later one.
    umt("export", str(run / "checkpoints" / "step2"), str(tmp_path / "step2"))
    early = (tmp_path / "step2" / "README.md").read_text()
    report2 = json.loads((run / "eval" / "step2.json").read_text())["report"]
    assert "Retrieval at step 2 " in early and "(step 2)" in early
    assert f"| itc | {report2['itc']['i2t_r1']:.2f} |" in early


def test_an_export_of_format_1_still_loads(export, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    import umt

    old = tmp_path / "v1"
    (old / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(export / name, old / "tokenizer" / name)
    state = load_file(export / "model.safetensors")
    save_file({k.removeprefix("umt."): v for k, v in state.items()}, old / "model.safetensors")
    manifest = json.loads((export / "umt_export.json").read_text())
    manifest["format_version"], manifest["text"]["tokenizer"] = 1, "tokenizer"
    (old / "umt_export.json").write_text(json.dumps(manifest))
    new_model, _ = umt.load(export)
    old_model, processor = umt.load(old)
    assert processor.tokenizer is not None
    ids, mask, pixels = inputs()
    for a, b in zip(outputs(new_model, ids, mask, pixels), outputs(old_model, ids, mask, pixels)):
        assert torch.equal(a, b)
