"""Checks of a training run's inputs before any expensive set-up (process group, model, DeepSpeed):
a shard path that is wrong, a tokenizer folder that is not there, a hard-negative field no sample
has. Each fails in one line naming its config key, seconds after `umt train` starts rather than
after the model is built (or, for the negatives field, never: it would train without them)."""

from __future__ import annotations

import urllib.request
from collections import Counter
from itertools import islice
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from data_pipeline.loader import LoaderConfigError, resolve_dataset
from data_pipeline.loader.stream import iter_raw_samples
from data_pipeline.storage import StorageError
from data_pipeline.tar_index import TarIndexError
from data_pipeline.transforms import load_tokenizer
from umt.config import Config, ConfigError, tokenizer_name

# Files of which a tokenizer folder has at least one (fast tokenizers, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
)
# Samples of the first shard looked at for the hard-negative field.
NEGATIVES_PROBE = 64


def check_training_inputs(cfg: Config) -> None:
    """Raise ConfigError (naming the key) for the first input of `cfg` that cannot be used."""
    d = cfg.data.train
    if d.synthetic:
        return
    check_tokenizer(cfg)
    splits = [("data.train.shards", d.shards, d.resampled)]
    if cfg.data.eval.shards is not None and cfg.eval.every_steps > 0:
        splits.append(("data.eval.shards", cfg.data.eval.shards, None))  # mixing ignored
    datasets = {key: check_shards(key, shards, resampled) for key, shards, resampled in splits}
    if d.negatives:
        check_negatives_field(d.negatives, datasets["data.train.shards"], cfg.data.cache_dir)


def check_shards(key: str, shards, resampled: bool | None):
    """The dataset `shards` names (manifests read, local tars checked), errors under `key`."""
    try:
        return resolve_dataset(shards, resampled)
    except (LoaderConfigError, TarIndexError, StorageError) as exc:
        message = str(exc)
        if message.startswith("data.shards"):
            message = message[len("data.shards") :].lstrip(":").strip()
            message = message.removeprefix("is empty: give a shard folder or pattern")
        raise ConfigError(f"{key}: {message or 'empty: give a shard folder or pattern'}") from None


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def check_tokenizer(cfg: Config) -> None:
    """The tokenizer loads (a folder that is not there is named as such, not as a bad Hub id)."""
    name = tokenizer_name(cfg)
    if name is None:
        return  # validate() already requires one
    key = "data.tokenizer" if cfg.data.tokenizer else "model.text.pretrained"
    if looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{key}: {name} is not a folder (a tokenizer folder or a Hub name)")
    if not looks_like_path(name):
        check_hub_name(key, name)
    folder = Path(name).expanduser()
    if looks_like_path(name) and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: {name} holds no tokenizer ({', '.join(TOKENIZER_FILES)}: none there)"
        )
    try:
        tokenizer = load_tokenizer(str(Path(name).expanduser()) if looks_like_path(name) else name)
    except (OSError, ValueError) as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise ConfigError(f"{key}: cannot load tokenizer {name!r}: {lines[0]}") from None
    check_tokenizer_fits(cfg, tokenizer, key, name)


HUB_PROBE_TIMEOUT_S = 5.0


def check_hub_name(key: str, name: str) -> None:
    """`name` is no local path, so it would be looked up on the Hugging Face Hub: refuse at once
    a mistyped folder (`tokenizers/mien` beside `tokenizers/mine`) and a Hub that cannot be reached
    (offline, or no network), instead of a minute of retries ending in "couldn't connect"."""
    parent = Path(name).parent
    if parent != Path(".") and parent.expanduser().is_dir():
        present = sorted(p.name for p in parent.expanduser().iterdir() if p.is_dir())[:8]
        raise ConfigError(
            f"{key}: folder {name} does not exist ({parent}/ holds: {', '.join(present) or 'no folders'})"
        )
    if name.count("/") > 1:  # a Hub name is `name` or `org/name`
        raise ConfigError(f"{key}: folder {name} does not exist")
    try:
        if isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str):
            return  # in the local Hub cache: loads without the network
    except HFValidationError:
        raise ConfigError(f"{key}: {name} is neither a folder here nor a Hub name") from None
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{key}: {name} is not a folder here, and the Hugging Face Hub is offline "
            "(HF_HUB_OFFLINE) with no copy of it in the cache"
        )
    endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(endpoint, timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:  # URLError, timeouts and refused connections
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"{key}: {name} is not a folder here, and {endpoint} cannot be reached to fetch it "
            f"as a Hub name ({reason})"
        ) from None


def check_tokenizer_fits(cfg: Config, tokenizer, key: str, name: str) -> None:
    """The model's text embedding covers the tokenizer's ids, and its pad and mask ids are the
    tokenizer's (else ids index past the table, or MLM masks with a token the text never has)."""
    text = cfg.model.text
    if len(tokenizer) > text.vocab_size:
        raise ConfigError(
            f"model.text.vocab_size {text.vocab_size} is below the {len(tokenizer)} tokens of "
            f"{key} {name}: set model.text.vocab_size={len(tokenizer)}"
        )
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != text.pad_token_id:
        raise ConfigError(
            f"model.text.pad_token_id {text.pad_token_id} is not the pad id of {key} {name} "
            f"({tokenizer.pad_token_id}): set model.text.pad_token_id={tokenizer.pad_token_id}"
        )
    mlm = cfg.model.mlm and cfg.objectives.mlm_weight > 0
    if mlm and tokenizer.mask_token_id != text.mask_token_id:
        raise ConfigError(
            f"model.text.mask_token_id {text.mask_token_id} is not the [MASK] id of {key} {name} "
            f"({tokenizer.mask_token_id}): set model.text.mask_token_id={tokenizer.mask_token_id}"
        )


def check_negatives_field(field_name: str, dataset, cache_dir: str | None) -> None:
    """Some of the first shard's first samples carry `field_name` in their json, else the run
    would train ITM without hard negatives and say nothing."""
    first = dataset.shards[0].path
    fields: set[str] = set()
    samples = list(islice(iter_raw_samples([first], Counter(), cache_dir), NEGATIVES_PROBE))
    for sample in samples:
        if field_name in sample.meta:
            return
        fields |= set(sample.meta)
    shown = ", ".join(sorted(fields)) or "none"
    raise ConfigError(
        f"data.train.negatives: no json field {field_name!r} in the first {len(samples)} samples "
        f"of {first} (their fields: {shown}); shard with --save-additional-columns {field_name}"
    )


ACCELERATE_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def check_accelerate_settings(cfg: Config, env: dict[str, str], cuda: bool) -> str | None:
    """Under `accelerate launch`: refuse what its config asks for and UMT would silently not do
    (another mixed precision, another ZeRO stage, FSDP); else a line for the log, or None when
    accelerate did not start this process. UMT's config decides: accelerate only starts ranks."""
    if "ACCELERATE_MIXED_PRECISION" not in env:
        return None
    asked = env["ACCELERATE_MIXED_PRECISION"]
    auto = "bf16" if cuda else "fp32"  # as train.precision=auto resolves
    ours = auto if cfg.train.precision == "auto" else cfg.train.precision
    if asked not in ACCELERATE_PRECISION:
        raise ConfigError(
            f"accelerate's mixed_precision={asked}: UMT trains in fp32, bf16 or fp16 "
            f"(train.precision); set mixed_precision to no, bf16 or fp16"
        )
    if asked != "no" and ACCELERATE_PRECISION[asked] != ours:
        raise ConfigError(
            f"accelerate's mixed_precision={asked} differs from train.precision={ours}: set one "
            f"to the other (train.precision={ACCELERATE_PRECISION[asked]}, or mixed_precision in "
            f"the accelerate config)"
        )
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError(
            "the accelerate config asks for FSDP: UMT shards with DeepSpeed ZeRO; use "
            "distributed_type: MULTI_GPU there and zero.stage=3 here"
        )
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None and int(stage) != cfg.zero.stage:
        raise ConfigError(
            f"the accelerate config's zero_stage={stage} differs from zero.stage={cfg.zero.stage}: "
            "UMT's config decides the ZeRO stage, set them equal"
        )
    return (
        f"started by accelerate launch (mixed_precision={asked}); UMT's config decides "
        f"precision ({ours}) and ZeRO stage ({cfg.zero.stage})"
    )
