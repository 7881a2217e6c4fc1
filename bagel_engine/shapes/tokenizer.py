"""A small byte-level BPE in the Qwen2 layout for the demo model, made with ``tokenizers``.

Same pre-tokenizer split, byte-level alphabet and decoder as Qwen2, the Qwen2 special tokens at
the end of the vocabulary, and the files the official code reads (``vocab.json``, ``merges.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``) beside ``tokenizer.json``. Any text
encodes (bytes are the fallback); the shapes world's words become one token each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bagel_engine.runtime.tokenizer import QWEN2_SPLIT

QWEN2_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens in all, the last ones the Qwen2 specials."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN2_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(texts), trainer)
    tok.add_special_tokens(list(QWEN2_SPECIALS))
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    """``tokenizer.json`` plus the official slow-tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = data["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(line + "\n" for line in lines))
    specials = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for s in QWEN2_SPECIALS}
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": specials,
              "additional_special_tokens": list(QWEN2_SPECIALS[1:]), "bos_token": None,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (out / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": list(QWEN2_SPECIALS[1:]), "eos_token": {"content": "<|im_end|>", **token},
        "pad_token": {"content": "<|endoftext|>", **token}}, indent=2))
