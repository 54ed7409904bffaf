"""A byte-level tokenizer built in code, for the tiny random presets (nothing is downloaded).

Every byte is one token (ids 0..255), then the family's special tokens. It is a real
``PreTrainedTokenizerFast``, so presets exercise the same text path (encode, decode, special tokens,
``save_pretrained``) as real checkpoints.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def build_byte_tokenizer(special_tokens: list[str], eos_token: str, pad_token: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: ids 0..255 are the bytes, then ``special_tokens`` in order."""
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps bytes to printable unicode chars; order them by byte value for stable ids.
    alphabet = sorted(byte_to_char, key=lambda ch: _byte_of_char(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token)
    fast.add_special_tokens({"additional_special_tokens": [t for t in special_tokens if t not in (eos_token, pad_token)]})
    return fast


def _byte_of_char(ch: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable latin-1 bytes map to themselves, the rest to 256+.
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
