"""`umt tokenizer train`: a BERT-style WordPiece tokenizer trained on the captions of shards, with
the `tokenizers` library, saved as a folder any `data.tokenizer` (or transformers'
`AutoTokenizer`) loads. [PAD] is id 0 and [MASK] is in the vocabulary, as the model expects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def shard_captions(shards: str, cache_dir: str | None = None) -> Iterator[str]:
    """Every caption of every sample (its own and its json captions), in stored order."""
    from data_pipeline.loader.stream import iter_raw_samples

    for sample in iter_raw_samples(shards, cache_dir=cache_dir):
        yield sample.text
        for caption in sample.captions:
            if caption != sample.text:
                yield caption


def train_wordpiece(texts, vocab_size: int, out: Path, lowercase: bool = True) -> int:
    """Train on `texts`, save to `out`; the vocabulary's size (at most `vocab_size`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return tokenizer.get_vocab_size()
