"""The tiny models' CLIP parts: a byte-level CLIP tokenizer that needs no download, and a small text encoder config."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_clip_tokenizer", "text_config"]


def _bytes_to_unicode() -> dict[int, str]:
    # The byte-to-character table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: Path) -> int:
    """Save a CLIP tokenizer with a byte-level vocabulary (every byte, with and without ``</w>``, no merges) into
    ``folder``; returns the vocabulary's size.

    Args:
        folder: where the tokenizer files go (created).
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    # transformers 5 takes ``vocab``/``merges``; it silently ignores the old ``vocab_file``/``merges_file`` names and
    # builds a two-token vocabulary in which every prompt encodes to nothing.
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return len(vocab)


def text_config(vocab_size: int):
    """A two-layer, 32-wide CLIP text encoder config over ``vocab_size`` tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )
