"""Translation data: byte tokens for every script, deduplication, disjoint splits, the sampler."""

from __future__ import annotations

import gzip
import os

import jax
import numpy as np
import pytest

from jaxmeta import tokens
from jaxmeta.data import translation as tdata
from jaxmeta.errors import ConfigError, DataError


def _all_files(translation_dir):
    tatoeba = sorted((translation_dir / "tatoeba").glob("*.tsv.gz"))
    flores = sorted((translation_dir / "flores200_devtest").glob("*.tsv.gz"))
    return tatoeba + flores


def test_every_file_parses_and_every_script_round_trips(translation_dir):
    files = _all_files(translation_dir)
    assert len(files) == 65 + 23
    scripts = set()
    for path in files:
        pairs = tdata.read_tsv(str(path))
        for src, eng in pairs:
            for text in (src, eng):
                ids = tokens.encode(text) + [tokens.EOS, tokens.PAD]
                assert min(ids[:-2], default=tokens.OFFSET) >= tokens.OFFSET
                assert max(ids) < tokens.VOCAB_SIZE
                assert tokens.decode(ids) == text
        scripts.update(ord(ch) >> 7 for src, _ in pairs[:200] for ch in src)
    # Latin, Cyrillic, Greek, Hebrew, Arabic, Devanagari, Bengali, Thai, Hangul, CJK, ... all in 128-blocks.
    assert len(scripts) > 20


def test_encode_batch_pads_truncates_and_keeps_eos():
    batch = tokens.encode_batch(["ab", "Zürich 東京"], 6, bos=True, eos=True)
    assert batch.dtype == np.uint16 and batch.shape == (2, 6)
    assert list(batch[0]) == [tokens.BOS, ord("a") + 3, ord("b") + 3, tokens.EOS, tokens.PAD, tokens.PAD]
    assert batch[1, -1] == tokens.EOS  # truncated, EOS kept
    assert tokens.decode(batch[1][1:]) == "Zür"
    # Cutting a multi-byte character repairs to U+FFFD instead of raising.
    cut = tokens.encode("東")[:2] + [tokens.EOS]
    assert tokens.decode(cut) == "\ufffd"


def test_deduplicate_keeps_first_translation_per_source():
    pairs = [("a", "x"), ("b", "y"), ("a", "z"), ("c", "w"), ("b", "v")]
    assert tdata.deduplicate(pairs) == [("a", "x"), ("b", "y"), ("c", "w")]


def test_real_splits_are_disjoint_deduplicated_and_deterministic(translation_dir):
    manifest = {}
    with open(translation_dir / "tatoeba" / "manifest.tsv") as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            row = dict(zip(header, line.rstrip("\n").split("\t")))
            manifest[row["code"]] = int(row["unique_source"])
    for code in ("ron", "kor", "lav"):
        pairs = tdata.read_tsv(str(translation_dir / "tatoeba" / f"{code}.tsv.gz"))
        splits = tdata.split_pairs(pairs, code=code, test=500, dev=200)
        sources = [{p[0] for p in part} for part in splits]
        assert sum(len(s) for s in sources) == manifest[code]  # every unique source once
        assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
        assert len(splits.test) == 500 and len(splits.dev) == 200
        again = tdata.split_pairs(pairs, code=code, test=500, dev=200)
        assert again == splits
        other_seed = tdata.split_pairs(pairs, code=code, test=500, dev=200, seed=1)
        assert other_seed.test != splits.test


def test_the_sampler_draws_disjoint_support_and_query_within_one_language():
    pairs = [[(f"{lang}{i}", f"e{i}") for i in range(n)] for lang, n in (("a", 40), ("b", 25))]
    data = tdata.language_arrays(pairs, 8)
    assert list(data["count"]) == [40, 25]
    sample = jax.jit(tdata.language_task_sampler(64, 5, 7))
    tasks = jax.device_get(sample(jax.random.PRNGKey(0), data))
    assert tasks.support[0].shape == (64, 5, 8) and tasks.query[1].shape == (64, 7, 9)
    for t in range(64):
        src = [tokens.decode(r) for r in np.concatenate([tasks.support[0][t], tasks.query[0][t]])]
        assert len(set(src)) == 12  # distinct pairs, support and query disjoint
        assert len({s[0] for s in src}) == 1  # one language per task
        assert all(s for s in src)  # never a padding row
    languages = {tokens.decode(tasks.support[0][t][0])[0] for t in range(64)}
    assert languages == {"a", "b"}


def _write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("line, what", [("only one field", "1 field"), ("", "empty line"),
                                        ("a\tb\tc", "3 field"), ("a\t ", "1 field") ])
def test_malformed_lines_are_named_by_file_and_line(tmp_path, line, what):
    path = str(tmp_path / "x.tsv.gz")
    _write(path, ["good\tpair", line, "more\tpairs"])
    with pytest.raises(DataError) as e:
        tdata.read_tsv(path)
    assert "x.tsv.gz:2" in str(e.value)
    assert (what in str(e.value)) or ("field" in str(e.value))


def test_unknown_languages_and_missing_data_are_refused(translation_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown language code"):
        tdata.check_languages(str(translation_dir), ["ron", "xx1"])
    with pytest.raises(DataError, match="no translation data"):
        tdata.read_manifest(str(tmp_path))
    assert tdata.flores_path(str(translation_dir), "lav").endswith("lvs_Latn.tsv.gz")
    assert tdata.flores_path(str(translation_dir), "ukr") is None
