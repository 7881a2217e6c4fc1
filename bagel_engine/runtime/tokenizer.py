"""The Qwen2 byte-level BPE tokenizer, framed the way BAGEL frames text.

Every text segment is ``<|im_start|> text <|im_end|>`` with no role names; decoding keeps special
tokens and then cuts at the first ``<|im_end|>`` and after the first ``<|im_start|>``.
Reads ``tokenizer.json`` when present, else builds the same tokenizer from ``vocab.json`` and
``merges.txt`` (the files the official slow tokenizer reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from bagel_engine.params import ConfigError

BOS, EOS = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
FALLBACK_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "fallback_tokenizer.json"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class SpecialIds:
    bos: int  # <|im_start|>
    eos: int  # <|im_end|>
    start_of_image: int  # <|vision_start|>
    end_of_image: int  # <|vision_end|>


def _from_vocab_merges(model_dir: Path) -> Tokenizer:
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if not vocab.exists() or not merges.exists():
        raise ConfigError(f"no tokenizer in {model_dir}: need tokenizer.json or vocab.json + merges.txt")
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class BagelTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._tok.add_special_tokens([BOS, EOS, VISION_START, VISION_END])  # no-op when present
        ids = [self._tok.token_to_id(t) for t in (BOS, EOS, VISION_START, VISION_END)]
        self.special = SpecialIds(*ids)

    @classmethod
    def from_dir(cls, model_dir: str | Path, fallback: bool = False) -> "BagelTokenizer":
        """The tokenizer of ``model_dir``; with ``fallback``, a small packaged Qwen2-layout tokenizer
        when the directory has none (for random-weight benchmarks built from configs alone)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists() and not (model_dir / "vocab.json").exists() and fallback:
            path = FALLBACK_TOKENIZER
        tok = Tokenizer.from_file(str(path)) if path.exists() else _from_vocab_merges(model_dir)
        return cls(tok)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone (no BOS is ever added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def frame(self, text: str) -> list[int]:
        """``<|im_start|> text <|im_end|>``: how BAGEL feeds every text segment."""
        return [self.special.bos, *self.encode(text), self.special.eos]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def decode_generation(self, ids: list[int]) -> str:
        """The official cleanup of a generated sequence that starts with ``<|im_start|>``."""
        text = self.decode(ids).split(EOS)[0]
        parts = text.split(BOS)
        return parts[1] if len(parts) > 1 else parts[0]
