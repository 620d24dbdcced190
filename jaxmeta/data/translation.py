"""Parallel text for MAML-style low-resource translation (Gu et al. 2018, "MetaNMT").

The data are the offline copy in ``../shared/data/translation`` (see its
README): Tatoeba pairs ``source<TAB>english`` for 65 languages, one gzip'd TSV
per language, plus FLORES-200 devtest for 23 of them.  This module reads and
checks them, deduplicates by source sentence *before* splitting (alternative
English translations of one source sentence would otherwise leak between
train and test), splits every language into disjoint train/dev/test sets, and
turns text into byte tokens: a vocabulary that covers every script, including
those never seen in meta-training.

Token ids (:mod:`jaxmeta.tokens`): ``PAD = 0``, ``BOS = 1``, ``EOS = 2``, byte ``b`` -> ``b + 3``.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmeta.data import provenance
from jaxmeta.errors import ConfigError, DataError
from jaxmeta.tokens import encode_batch
from jaxmeta.types import Task

DATA_DIR_ENV = "JAXMETA_TRANSLATION_DIR"

# Gu et al.'s roles as the manifest names them; two validation languages of our
# choosing (neither a meta-training nor a target language, two scripts).
ROLE_META_TRAIN = "meta-train(Gu18)"
ROLE_TARGET = "target(Gu18)"
VALIDATION_LANGUAGES = ("ukr", "isl")
# Tatoeba code -> FLORES-200 code where the FLORES one is not simply "<code>_<script>".
FLORES_ALIASES = {"lav": "lvs"}


def byte_length(text: str) -> int:
    return len(text.encode("utf-8"))


# --------------------------------------------------------------------------------------
# Reading and checking the files.
# --------------------------------------------------------------------------------------


def default_data_dir() -> str:
    """``$JAXMETA_TRANSLATION_DIR``, else ``../shared/data/translation`` beside the repository."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "data", "translation"))


def read_tsv(path: str) -> list[tuple[str, str]]:
    """``(source, english)`` pairs of one gzip'd (or plain) TSV file.

    Raises:
      DataError: a missing file, undecodable text, or a line that is not two
        non-empty tab-separated fields (named by file and line number).
    """
    if not os.path.isfile(path):
        raise DataError(f"missing data file {path}")
    opener = gzip.open if path.endswith(".gz") else open
    pairs = []
    try:
        with opener(path, "rt", encoding="utf-8", newline="\n") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n").rstrip("\r")
                fields = line.split("\t")
                if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                    what = "an empty line" if not line.strip() else f"{len(fields)} field(s)"
                    raise DataError(f"{path}:{number}: expected 'source<TAB>english', got {what}")
                pairs.append((fields[0].strip(), fields[1].strip()))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not pairs:
        raise DataError(f"{path} holds no sentence pairs")
    return pairs


def read_manifest(data_dir: str) -> dict[str, str]:
    """Tatoeba language code -> role (``meta-train(Gu18)``, ``target(Gu18)`` or ``""``)."""
    path = os.path.join(data_dir, "tatoeba", "manifest.tsv")
    if not os.path.isfile(path):
        raise DataError(
            f"no translation data at {data_dir} (missing tatoeba/manifest.tsv); "
            f"pass --data-dir or set {DATA_DIR_ENV}"
        )
    roles = {}
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if "code" not in header or "role_in_gu2018" not in header:
            raise DataError(f"{path}: unexpected header {header}")
        for line in f:
            if line.strip():
                row = dict(zip(header, line.rstrip("\n").split("\t")))
                roles[row["code"]] = row.get("role_in_gu2018", "") or ""
    return roles


def languages_with_role(data_dir: str, role: str) -> tuple[str, ...]:
    return tuple(code for code, r in read_manifest(data_dir).items() if r == role)


def check_languages(data_dir: str, codes: Sequence[str]) -> None:
    """Raises :class:`ConfigError` for a code that has no Tatoeba file."""
    known = read_manifest(data_dir)
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise ConfigError(f"unknown language code(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def flores_path(data_dir: str, code: str) -> str | None:
    """The FLORES-200 devtest file of a Tatoeba language code, if there is one."""
    folder = os.path.join(data_dir, "flores200_devtest")
    prefix = FLORES_ALIASES.get(code, code) + "_"
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix) and name.endswith(".tsv.gz"):
            return os.path.join(folder, name)
    return None


def corpus_identity(data_dir: str, codes: Sequence[str]) -> dict:
    """The identity (names, sizes, SHA-256) of the files a run of ``codes`` reads.

    The manifest, each language's Tatoeba file and, where there is one, its
    FLORES-200 devtest file (:func:`jaxmeta.data.provenance.identity`).
    """
    files = {"tatoeba/manifest.tsv": provenance.file_entry(os.path.join(data_dir, "tatoeba", "manifest.tsv"))}
    for code in dict.fromkeys(codes):
        files[f"tatoeba/{code}.tsv.gz"] = provenance.file_entry(os.path.join(data_dir, "tatoeba", f"{code}.tsv.gz"))
        flores = flores_path(data_dir, code)
        if flores is not None:
            files[f"flores200_devtest/{os.path.basename(flores)}"] = provenance.file_entry(flores)
    return provenance.identity("translation", files, source=os.path.abspath(data_dir))


# --------------------------------------------------------------------------------------
# Deduplication and splits.
# --------------------------------------------------------------------------------------


def deduplicate(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """One pair per source sentence (the first English translation in file order)."""
    seen, out = set(), []
    for src, eng in pairs:
        if src not in seen:
            seen.add(src)
            out.append((src, eng))
    return out


class Splits(NamedTuple):
    train: list[tuple[str, str]]
    dev: list[tuple[str, str]]
    test: list[tuple[str, str]]


def split_pairs(pairs: Sequence[tuple[str, str]], *, code: str, test: int, dev: int, seed: int = 0) -> Splits:
    """Deduplicates by source, shuffles (seeded by ``seed`` and the language) and splits.

    The order of the training pairs is fixed too, so "the first N training pairs"
    is a well-defined, nested family of data sizes.

    Raises:
      DataError: fewer unique pairs than ``test + dev + 1``.
    """
    unique = deduplicate(pairs)
    if len(unique) < test + dev + 1:
        raise DataError(f"{code}: {len(unique)} unique pairs, need more than test {test} + dev {dev}")
    rng = np.random.default_rng([seed, zlib.crc32(code.encode())])
    order = rng.permutation(len(unique))
    shuffled = [unique[i] for i in order]
    return Splits(train=shuffled[test + dev:], dev=shuffled[test : test + dev], test=shuffled[:test])


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Every language's splits, read once.

    Attributes:
      data_dir: where the files are.
      splits: language code -> :class:`Splits`.
    """

    data_dir: str
    splits: dict

    def train(self, code: str) -> list[tuple[str, str]]:
        return self.splits[code].train

    def flores(self, code: str) -> list[tuple[str, str]] | None:
        path = flores_path(self.data_dir, code)
        return None if path is None else read_tsv(path)


def load_corpus(data_dir: str, codes: Sequence[str], *, test: int, dev: int, seed: int = 0) -> Corpus:
    """Reads, deduplicates and splits ``codes`` (checked against the manifest)."""
    check_languages(data_dir, codes)
    splits = {}
    for code in dict.fromkeys(codes):
        pairs = read_tsv(os.path.join(data_dir, "tatoeba", f"{code}.tsv.gz"))
        splits[code] = split_pairs(pairs, code=code, test=test, dev=dev, seed=seed)
    return Corpus(data_dir, splits)


# --------------------------------------------------------------------------------------
# Arrays for the compiled samplers.
# --------------------------------------------------------------------------------------


def fits(pair: tuple[str, str], max_len: int) -> bool:
    """Whether a pair fits ``max_len`` source tokens and ``max_len`` target tokens (+BOS/EOS)."""
    return byte_length(pair[0]) <= max_len and byte_length(pair[1]) + 1 <= max_len


def pair_arrays(pairs: Sequence[tuple[str, str]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(source [n, max_len], target [n, max_len + 1])``; the target is ``BOS english EOS``."""
    src = encode_batch([p[0] for p in pairs], max_len)
    tgt = encode_batch([p[1] for p in pairs], max_len + 1, bos=True, eos=True)
    return src, tgt


def language_arrays(pair_lists: Sequence[Sequence[tuple[str, str]]], max_len: int) -> dict[str, np.ndarray]:
    """Languages stacked for the on-device sampler (pairs longer than ``max_len`` left out).

    Returns:
      ``{"source": [langs, n, max_len], "target": [langs, n, max_len + 1], "count": [langs]}``
      with ``n`` the largest language's count (the rest is padding).
    """
    kept = [[p for p in pairs if fits(p, max_len)] for pairs in pair_lists]
    for pairs in kept:
        if len(pairs) < 2:
            raise DataError(f"a language has {len(pairs)} pair(s) of at most {max_len} bytes; need 2 or more")
    n = max(len(p) for p in kept)
    source = np.zeros((len(kept), n, max_len), np.uint16)
    target = np.zeros((len(kept), n, max_len + 1), np.uint16)
    for i, pairs in enumerate(kept):
        source[i, : len(pairs)], target[i, : len(pairs)] = pair_arrays(pairs, max_len)
    return {"source": source, "target": target, "count": np.array([len(p) for p in kept], np.int32)}


def language_task_sampler(meta_batch: int, support: int, query: int):
    """``sample(key, data) -> Task``: each task one language, disjoint support and query pairs.

    Languages are drawn uniformly (with replacement across the batch); within a
    language, ``support + query`` distinct pairs (Gumbel top-k over its valid
    pairs).  ``data`` is :func:`language_arrays`' dict on the device.
    """

    def one(key, data):
        k_lang, k_pairs = jax.random.split(key)
        lang = jax.random.randint(k_lang, (), 0, data["count"].shape[0])
        n = data["source"].shape[1]
        scores = jax.random.uniform(k_pairs, (n,))
        scores = jnp.where(jnp.arange(n) < data["count"][lang], scores, -1.0)
        _, idx = jax.lax.top_k(scores, support + query)
        src = data["source"][lang][idx].astype(jnp.int32)
        tgt = data["target"][lang][idx].astype(jnp.int32)
        return Task(support=(src[:support], tgt[:support]), query=(src[support:], tgt[support:]))

    def sample(key, data):
        return jax.vmap(one, in_axes=(0, None))(jax.random.split(key, meta_batch), data)

    return sample
