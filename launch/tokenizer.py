"""`umt tokenizer train SHARDS --vocab-size N --out DIR`: a WordPiece tokenizer trained on the
shards' captions (offline, with the `tokenizers` library), for `data.tokenizer: DIR`; set
`model.text.vocab_size` to at least the size it prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="umt tokenizer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a WordPiece tokenizer on shards' captions")
    train.add_argument("shards", help="shard folder, brace pattern, list, s3:// or http(s)://")
    train.add_argument("--vocab-size", type=int, default=8192, help="at most this many tokens")
    train.add_argument("--out", required=True, help="folder to write the tokenizer to")
    train.add_argument("--cased", action="store_true", help="keep case (default: lowercase)")
    train.add_argument("--cache-dir", help="node-local folder for copies of remote shards")
    args = parser.parse_args(argv)
    if args.vocab_size <= 5:  # the five special tokens
        print(f"umt tokenizer: --vocab-size must be > 5 (got {args.vocab_size})", file=sys.stderr)
        return 2

    from data_pipeline.loader import LoaderConfigError
    from data_pipeline.storage import StorageError
    from data_pipeline.tokenizer_training import SPECIAL_TOKENS, shard_captions, train_wordpiece

    counted = [0]

    def texts():
        for text in shard_captions(args.shards, args.cache_dir):
            counted[0] += 1
            yield text

    try:
        size = train_wordpiece(texts(), args.vocab_size, Path(args.out), lowercase=not args.cased)
    except (LoaderConfigError, StorageError) as exc:
        message = str(exc).removeprefix("data.shards").lstrip(": ")
        named = message if message.startswith(args.shards) else f"{args.shards}: {message}"
        print(f"umt tokenizer: SHARDS {named}", file=sys.stderr)
        return 2
    if counted[0] == 0:
        print(f"umt tokenizer: {args.shards} holds no caption", file=sys.stderr)
        return 1
    print(
        f"trained on {counted[0]} captions: {size} tokens -> {args.out}\n"
        f"use it with: data.tokenizer={Path(args.out).resolve()} model.text.vocab_size={size} "
        f"model.text.mask_token_id={SPECIAL_TOKENS.index('[MASK]')}"
    )
    return 0
