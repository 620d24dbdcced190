"""Byte-level tokens: the vocabulary shared by the translation data and the Transformer.

Token ids: ``PAD = 0``, ``BOS = 1``, ``EOS = 2``, byte ``b`` -> ``b + 3``.  A
vocabulary of UTF-8 bytes covers every script, including those never seen in
meta-training.  It lives apart from both the data set and the model, so the
model does not depend on a data set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
VOCAB_SIZE = 256 + OFFSET


def encode(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as token ids (no BOS/EOS)."""
    return [b + OFFSET for b in text.encode("utf-8")]


def decode(ids: Iterable[int]) -> str:
    """Token ids back to text: stops at the first EOS, skips PAD/BOS, repairs broken UTF-8."""
    out = bytearray()
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i >= OFFSET:
            out.append(i - OFFSET)
    return out.decode("utf-8", errors="replace")


def encode_batch(texts: Sequence[str], length: int, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """``texts`` as a ``[len(texts), length]`` uint16 array, PAD-filled, truncated to ``length``.

    With ``eos`` the EOS token is kept even when the text is truncated.
    """
    out = np.full((len(texts), length), PAD, np.uint16)
    for row, text in enumerate(texts):
        ids = ([BOS] if bos else []) + encode(text)
        ids = ids[: length - 1] + [EOS] if eos else ids[:length]
        out[row, : len(ids)] = ids
    return out
