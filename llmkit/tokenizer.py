"""Tokenizers: train a character-level or byte-level BPE tokenizer with `tokenizers`, or load one.

A trained tokenizer is wrapped as a PreTrainedTokenizerFast, so `AutoTokenizer.from_pretrained`
loads it from the model directory like any other.
"""

from __future__ import annotations

from pathlib import Path

from collections import Counter

from llmkit.errors import LlmkitError, first_line
from llmkit.settings import TokenizerSettings

# Causal models read <s> text ...; packing closes each document with </s>. Masked models read
# [CLS] text [SEP] and learn to fill [MASK]. Encoder-decoders (T5's convention) read text </s> and write
# text </s>, the decoder starting from <pad>.
SPECIAL_TOKENS = {
    "causal": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "seq2seq": {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "mlm": {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
            "mask_token": "[MASK]"},
}
MIN_CHAR_COVERAGE = 0.99  # a char-level vocabulary must cover this share of the training characters
BYTE_ALPHABET = 256


def load_tokenizer(path: str):
    """A saved tokenizer: a folder, or a hub id (a local-looking name that is not there is an error)."""
    from transformers import AutoTokenizer

    from llmkit.recipe import looks_local

    if not Path(path).expanduser().exists() and looks_local(str(path)):
        raise LlmkitError(f"tokenizer not found: {path} (no such folder)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise LlmkitError(f"cannot load a tokenizer from {path}: {first_line(error)}") from None


def train_tokenizer(documents: list[str], settings: TokenizerSettings, objective: str):
    """Train on the training documents; the result is ready for save_pretrained."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS["mlm" if objective == "mlm+nsp" else objective]
    names = list(dict.fromkeys(special.values()))
    if settings.kind == "char":
        check_char_coverage(documents, settings, len(names))
        tokenizer = Tokenizer(models.WordLevel(unk_token=special["unk_token"]))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
                                            show_progress=False,  # llmkit shows its own status
                                            special_tokens=names)
    else:
        if settings.vocab_size < BYTE_ALPHABET + len(names):
            raise LlmkitError(f"tokenizer.vocab_size = {settings.vocab_size} is too small for byte-level BPE: "
                              f"it needs at least {BYTE_ALPHABET + len(names)} (256 bytes + special tokens)")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
                                      show_progress=False,
                                      special_tokens=names, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    tokenizer.post_processor = template(tokenizer, special)
    # Next-sentence prediction reads segment ids: the saved tokenizer returns them for pairs, as in pretraining.
    segments = {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]} if objective == "mlm+nsp" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special, **segments)


def template(tokenizer, special: dict):
    from tokenizers import processors

    if "bos_token" not in special and "cls_token" not in special:  # seq2seq: the end token closes each text
        eos = special["eos_token"]
        return processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                             special_tokens=[(eos, tokenizer.token_to_id(eos))])
    if "bos_token" in special:
        bos = special["bos_token"]
        return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                             special_tokens=[(bos, tokenizer.token_to_id(bos))])
    cls, sep = special["cls_token"], special["sep_token"]
    return processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))])


def check_char_coverage(documents: list[str], settings: TokenizerSettings, n_special: int) -> None:
    """Refuse a vocabulary so small that many training characters would become <unk>."""
    counts = Counter()
    for doc in documents:
        counts.update(doc)
    frequent = [n for _, n in counts.most_common() if n >= settings.min_frequency]
    total = sum(counts.values())
    kept = sum(frequent[: max(settings.vocab_size - n_special, 0)])
    if kept < MIN_CHAR_COVERAGE * total:
        running, needed = 0, 0
        for needed, n in enumerate(frequent, 1):
            running += n
            if running >= MIN_CHAR_COVERAGE * total:
                break
        raise LlmkitError(f"tokenizer.vocab_size = {settings.vocab_size} is too small: a char-level vocabulary "
                          f"of that size covers {kept / total:.1%} of the training characters; "
                          f"use at least {needed + n_special} to cover {MIN_CHAR_COVERAGE:.0%}")
