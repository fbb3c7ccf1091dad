"""`umt tokenizer train` and `configs/tiny_cpu.yaml`: a tokenizer trained offline on one's own
shards, then the shipped CPU config trained on them with it; a tokenizer that does not fit the
model's text keys is named before any set-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from launch import tokenizer as tokenizer_cli
from tests.conftest import REPO


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_pipeline.builtin import write_split
    from data_pipeline.shard import ShardOptions, shard_dataset

    root = tmp_path_factory.mktemp("tok")
    table = write_split(root / "data", "train", 32, 32)
    options = ShardOptions(image_col="image", caption_col="captions", resize="none", maxcount=16)
    shard_dataset(table, root / "shards", options)
    return root / "shards"


def test_a_wordpiece_tokenizer_trained_on_the_captions(tmp_path, shards, capsys):
    out = tmp_path / "tokenizer"
    assert tokenizer_cli.main(["train", str(shards), "--vocab-size", "300", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert said.startswith("trained on ") and f"model.text.vocab_size={len(tokenizer)}" in said
    assert (tokenizer.pad_token_id, tokenizer.mask_token_id) == (0, 4)
    assert len(tokenizer) <= 300
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A red circle above")["input_ids"])
    assert tokens == ["[CLS]", "a", "red", "circle", "above", "[SEP]"]  # whole caption words
    assert tokenizer_cli.main(["train", str(shards), "--vocab-size", "5", "--out", str(out)]) == 2
    table = shards.parent / "data" / "train.jsonl"  # the table, not its shards: named as given
    assert tokenizer_cli.main(["train", str(table), "--out", str(tmp_path / "t2")]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == f"umt tokenizer: SHARDS {table} is not a readable tar: invalid header"


@pytest.mark.slow
def test_tiny_cpu_config_trains_on_own_shards_with_that_tokenizer(tmp_path, shards):
    tokenizer = tmp_path / "tokenizer"
    assert tokenizer_cli.main(["train", str(shards), "--out", str(tokenizer)]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = [
        sys.executable, "-m", "launch.cli", "train", "--config", "tiny_cpu",
        f"data.train.shards={shards}", f"data.tokenizer={tokenizer}", "train.micro_batch_size=8",
        "model.image.image_size=32", "data.train.num_workers=0",
    ]  # fmt: skip
    run = tmp_path / "run"
    proc = subprocess.run(
        [*common, f"output_dir={run}", "train.steps=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step2").is_dir()
    assert re.search(r"last losses: .*mlm \d", proc.stderr)  # MLM trained with the [MASK] id
    # A mask id that is not the tokenizer's: named, with the value to set, before any set-up.
    proc = subprocess.run(
        [*common, f"output_dir={tmp_path / 'bad'}", "model.text.mask_token_id=103"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2 and not (tmp_path / "bad").exists()
    assert proc.stderr.strip().splitlines()[-1].endswith("set model.text.mask_token_id=4")
