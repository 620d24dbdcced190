"""Tests for the Omniglot pipeline (jaxmeta.data.omniglot) and folder episodes."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxmeta.data import omniglot
from jaxmeta.data.folders import load_folder_episode
from jaxmeta.errors import ConfigError, DataError

SMALL = ("images_background_small1.zip", "images_background_small2.zip")


def _fingerprints(x: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint per image of float images in [0, 1] (exact on 8-bit values)."""
    u8 = np.rint(x.reshape(-1, 28 * 28) * 255).astype(np.int64)
    weights = np.random.default_rng(0).integers(1, 2**62, size=28 * 28, dtype=np.int64)
    return u8 @ weights  # wraps modulo 2**64: fine for a fingerprint


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------
# Splits (no data needed).
# ----------------------------------------------------------------------------------------


def test_maml_split_ids() -> None:
    ids = omniglot.split_character_ids("maml")
    assert (len(ids.train), len(ids.val), len(ids.test)) == (1100, 100, 423)
    all_ids = np.concatenate([ids.train, ids.val, ids.test])
    np.testing.assert_array_equal(np.sort(all_ids), np.arange(1623))  # disjoint and complete
    # Fixed seed: the split never changes.
    np.testing.assert_array_equal(ids.train[:5], [713, 1081, 1577, 509, 665])
    np.testing.assert_array_equal(ids.test[:3], [917, 183, 1441])
    again = omniglot.split_character_ids("maml")
    for a, b in zip(ids, again):
        np.testing.assert_array_equal(a, b)


def test_lake_split_ids() -> None:
    ids = omniglot.split_character_ids("lake")
    assert ids.val is None
    np.testing.assert_array_equal(ids.train, np.arange(964))
    np.testing.assert_array_equal(ids.test, np.arange(964, 1623))
    with pytest.raises(ConfigError, match="unknown Omniglot split 'nope'"):
        omniglot.split_character_ids("nope")


def test_directory_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAXMETA_CACHE_DIR", raising=False)
    monkeypatch.delenv("JAXMETA_OMNIGLOT_DIR", raising=False)
    assert omniglot.resolve_cache_dir() == Path.home() / ".cache" / "jaxmeta"
    assert omniglot.resolve_data_dir() is None  # -> TFDS's normal download
    monkeypatch.setenv("JAXMETA_CACHE_DIR", str(tmp_path / "env_cache"))
    monkeypatch.setenv("JAXMETA_OMNIGLOT_DIR", str(tmp_path / "env_data"))
    assert omniglot.resolve_cache_dir() == tmp_path / "env_cache"
    with pytest.raises(DataError, match="Omniglot archive directory not found: .*env_data"):
        omniglot.cache_path()  # the archives named must be there: their SHA-256 keys the cache
    assert omniglot.resolve_data_dir() == tmp_path / "env_data"
    assert omniglot.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"  # argument wins
    assert omniglot.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_rotate_classes_order() -> None:
    x = np.random.default_rng(0).random((3, 2, 5, 5, 1)).astype(np.float32)
    r = omniglot.rotate_classes(x)
    assert r.shape == (12, 2, 5, 5, 1)
    for i in range(3):
        for k in range(4):
            np.testing.assert_array_equal(r[4 * i + k], np.rot90(x[i], k, axes=(1, 2)))


# ----------------------------------------------------------------------------------------
# Preprocessing.
# ----------------------------------------------------------------------------------------


def test_preprocess_image_polarity_and_shape() -> None:
    img = Image.new("1", (105, 105), 1)  # white background, as in Omniglot
    img.paste(0, (30, 30, 75, 75))  # black (ink) square
    x = omniglot.preprocess_image(img)
    assert x.shape == (28, 28, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert x[0, 0, 0] == 0.0 and x[14, 14, 0] == 1.0  # background 0, ink 1
    assert abs(x.mean() - (45 / 105) ** 2) < 0.02  # ink fraction preserved by resizing
    # Lanczos on 8-bit gray gives intermediate values at the edges (not nearest).
    assert ((x > 0.05) & (x < 0.95)).any()
    # Any size / mode; transparency composited on white (= background).
    rgba = Image.new("RGBA", (50, 80), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (10, 10, 40, 70))
    y = omniglot.preprocess_image(rgba)
    assert y.shape == (28, 28, 1) and y[0, 0, 0] == 0.0 and y[14, 14, 0] == 1.0


# ----------------------------------------------------------------------------------------
# Extraction safety and errors.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt"])
def test_zip_slip_refused(tmp_path: Path, entry: str) -> None:
    archive = tmp_path / "images_background_small1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images_background_small1/ok.txt", "fine")
        info = zipfile.ZipInfo("placeholder")
        info.filename = entry  # bypass any sanitising of the writer
        zf.writestr(info, "pwned")
    dest = tmp_path / "out" / "x"
    with pytest.raises(DataError, match="zip-slip") as e:
        omniglot.extract_archive(archive, dest)
    assert str(archive) in _one_line(e)
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out" / "evil.txt").exists()
    assert os.listdir(tmp_path / "out") == []  # temp dir cleaned up


def test_corrupt_zip_refused(tmp_path: Path, omniglot_dir: Path) -> None:
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip at all" * 100)
    with pytest.raises(DataError, match="corrupt or unreadable zip") as e:
        omniglot.extract_archive(garbage, tmp_path / "a")
    assert str(garbage) in _one_line(e)
    # A real archive with damaged compressed data (CRC / deflate errors).
    data = bytearray((omniglot_dir / SMALL[0]).read_bytes())
    for i in range(2000, len(data) // 2, 997):
        data[i] ^= 0xFF
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt or unreadable zip") as e:
        omniglot.extract_archive(damaged, tmp_path / "b")
    assert str(damaged) in _one_line(e)
    assert not (tmp_path / "b").exists()


def test_missing_dir_and_archive_messages(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="archive directory not found") as e:
        omniglot.prepare_tfds(data_dir=missing, cache_dir=tmp_path / "c", config="small")
    msg = _one_line(e)
    assert str(missing) in msg and "characterNN/XXXX_YY.png" in msg and SMALL[0] in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="archive not found") as e:
        omniglot.load("lake", data_dir=empty, cache_dir=tmp_path / "c2")
    msg = _one_line(e)
    assert str(empty / "images_background.zip") in msg and "images_evaluation.zip" in msg
    with pytest.raises(ConfigError, match="unknown Omniglot TFDS config"):
        omniglot.prepare_tfds(data_dir=empty, cache_dir=tmp_path / "c3", config="big")


def test_corrupt_archive_refused_by_builder(tmp_path: Path, omniglot_dir: Path) -> None:
    data_dir = tmp_path / "archives"
    data_dir.mkdir()
    (data_dir / SMALL[0]).write_bytes(b"PK\x03\x04 truncated")
    (data_dir / SMALL[1]).symlink_to(omniglot_dir / SMALL[1])
    with pytest.raises(DataError, match="corrupt or unreadable zip") as e:
        omniglot.prepare_tfds(data_dir=data_dir, cache_dir=tmp_path / "c", config="small")
    assert str(data_dir / SMALL[0]) in _one_line(e)


# ----------------------------------------------------------------------------------------
# TFDS preparation from local archives.
# ----------------------------------------------------------------------------------------


def test_tfds_prepare_small_archives_and_tf_free_read(
    tmp_path: Path, omniglot_dir: Path
) -> None:
    data_dir = tmp_path / "archives"
    data_dir.mkdir()
    for name in SMALL:  # only the small archives: the "small" config needs nothing else
        (data_dir / name).symlink_to(omniglot_dir / name)
    cache = tmp_path / "cache"
    builder = omniglot.prepare_tfds(data_dir=data_dir, cache_dir=cache, config="small")
    assert isinstance(builder, omniglot.LocalOmniglot)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "small1": 2720,
        "small2": 3120,
    }
    (keyed,) = cache.glob("omniglot-*")
    assert str(builder.data_dir).startswith(str(keyed / "tfds"))
    assert "array_record" in builder.info.file_format.value
    assert not list((keyed / "tfds" / "downloads").glob("jaxmeta_extracted-*"))  # cleaned
    # Idempotent: prepared once per set of archives (keyed by their SHA-256) ...
    prepared = {p: p.stat().st_mtime_ns for p in (keyed / "tfds").rglob("*") if p.is_file()}
    again = omniglot.prepare_tfds(data_dir=data_dir, cache_dir=cache, config="small")
    assert {p: p.stat().st_mtime_ns for p in (keyed / "tfds").rglob("*") if p.is_file()} == prepared
    assert again.info.splits["small2"].num_examples == 3120 and again.data_dir == builder.data_dir
    # ... and a directory named must hold them, even when another copy is prepared.
    with pytest.raises(DataError, match="Omniglot archive directory not found: .*gone"):
        omniglot.prepare_tfds(data_dir=tmp_path / "gone", cache_dir=cache, config="small")
    # Read back without TensorFlow: a fresh process must never import it.
    script = f"""
import sys, io
import tensorflow_datasets as tfds
from PIL import Image
from jaxmeta.data import omniglot
b = omniglot.LocalOmniglot(data_dir={str(keyed / "tfds")!r}, config="small")
src = b.as_data_source("small1", decoders={{"image": tfds.decode.SkipDecoding()}})
exs = src.__getitems__(range(len(src)))
labels = sorted({{int(e["label"]) for e in exs}})
img = Image.open(io.BytesIO(exs[0]["image"]))
assert img.size == (105, 105), img.size
assert all(1 <= int(e["drawer"]) <= 20 for e in exs)
print(len(exs), len(labels), max(labels), "tensorflow" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=Path(omniglot.__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    n, n_labels, max_label, tf_imported = out.stdout.split()[-4:]
    # small1: 136 characters x 20 drawers, all background characters (ids < 964).
    assert (int(n), int(n_labels)) == (2720, 136) and int(max_label) < 964
    assert tf_imported == "False"


# ----------------------------------------------------------------------------------------
# The real archives: full preparation once per session, then the cache.
# ----------------------------------------------------------------------------------------


def test_characters_cache_contents(omniglot_characters, omniglot_dir: Path) -> None:
    chars = omniglot_characters
    assert chars.images.shape == (1623, 20, 28, 28) and chars.images.dtype == np.uint8
    np.testing.assert_array_equal(chars.background, np.arange(1623) < 964)
    assert len(set(chars.alphabet[:964])) == 30 and len(set(chars.alphabet[964:])) == 20
    assert set(chars.alphabet) == set(omniglot.ALPHABETS)
    x = chars.images.astype(np.float32) / 255
    # Ink (1.0) on background (0.0): corners are background, ~8% of pixels inked.
    assert x[:, :, 0, 0].max() < 0.05
    assert 0.04 < x.mean() < 0.15
    per_image = x.mean(axis=(2, 3))
    assert per_image.min() > 0.001  # every drawing has ink (the smallest is a dot)
    assert 0.05 < np.median(per_image) < 0.12
    # Cache equals preprocess_image of the original PNG, by global id and drawer.
    with zipfile.ZipFile(omniglot_dir / "images_evaluation.zip") as zf:
        name = next(n for n in zf.namelist() if n.endswith("/1000_07.png"))
        with Image.open(io.BytesIO(zf.read(name))) as img:
            assert img.mode == "1"
            expected = omniglot.preprocess_image(img)
    np.testing.assert_array_equal(x[999, 6], expected[..., 0])
    assert chars.alphabet[999] == name.split("/")[1]


def test_cached_load_reads_the_cache_keyed_by_the_archives(
    omniglot_characters, omniglot_dir: Path, jaxmeta_cache_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    path = omniglot.cache_path(jaxmeta_cache_dir, data_dir=omniglot_dir)
    digest = omniglot.source_identity(omniglot_dir)["digest"]
    assert path == jaxmeta_cache_dir / f"omniglot-{digest[:16]}" / omniglot.CACHE_FILENAME
    entries = sorted(p.name for p in path.parent.iterdir())
    assert omniglot.CACHE_FILENAME in entries and omniglot.CACHE_FILENAME + ".manifest.json" in entries
    assert not [e for e in entries if ".tmp" in e]  # atomic write left no temp file
    assert (path.parent / "tfds" / "jaxmeta_omniglot" / "lake").is_dir()
    assert path.stat().st_size / 2**20 < 15
    monkeypatch.setenv("JAXMETA_CACHE_DIR", str(jaxmeta_cache_dir))
    monkeypatch.setenv("JAXMETA_OMNIGLOT_DIR", str(omniglot_dir))
    before = path.stat().st_mtime_ns

    def no_preparing(**_):
        raise AssertionError("a cached load prepared the archives again")

    with monkeypatch.context() as patched:
        patched.setattr(omniglot, "prepare_tfds", no_preparing)
        splits = omniglot.load("maml")  # hashes the archives, checks the cache's SHA-256, reads it
    assert path.stat().st_mtime_ns == before  # read, not rewritten
    assert splits.train.shape == (4400, 20, 28, 28, 1)
    # Without any directory named, the cache this machine has is the data set.
    monkeypatch.delenv("JAXMETA_OMNIGLOT_DIR")
    assert omniglot.source_identity()["digest"] == digest
    # A directory named must hold the archives: no falling back to another copy's cache.
    monkeypatch.setenv("JAXMETA_OMNIGLOT_DIR", str(tmp_path / "nonexistent"))
    with pytest.raises(DataError, match="Omniglot archive directory not found"):
        omniglot.load("maml")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Omniglot archive not found: .*images_background.zip"):
        omniglot.load("maml", data_dir=tmp_path / "empty")


def test_damaged_character_cache_is_rebuilt(omniglot_characters, omniglot_dir: Path, jaxmeta_cache_dir: Path,
                                            tmp_path: Path) -> None:
    """A flipped byte in the cache is caught by its SHA-256 and the cache rebuilt from the records."""
    from jaxmeta.errors import JaxmetaWarning

    # On a copy: the session's cache is read by other tests (and other xdist workers) meanwhile.
    keyed = omniglot.cache_path(jaxmeta_cache_dir, data_dir=omniglot_dir).parent
    cache = tmp_path / "cache"
    shutil.copytree(keyed, cache / keyed.name, ignore=shutil.ignore_patterns("*.lock"))
    path = omniglot.cache_path(cache, data_dir=omniglot_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.warns(JaxmetaWarning, match="Omniglot cache .* is damaged .*rebuilding it"):
        again = omniglot.load_characters(data_dir=omniglot_dir, cache_dir=cache)
    np.testing.assert_array_equal(again.images, omniglot_characters.images)


def test_maml_split_with_rotations(omniglot_characters, jaxmeta_cache_dir: Path) -> None:
    splits = omniglot.load("maml", cache_dir=jaxmeta_cache_dir)
    ids = omniglot.split_character_ids("maml")
    assert splits.train.shape == (4400, 20, 28, 28, 1)
    assert splits.val.shape == (100, 20, 28, 28, 1)
    assert splits.test.shape == (423, 20, 28, 28, 1)
    for part in splits:
        assert part.dtype == np.float32 and part.min() >= 0.0 and part.max() <= 1.0
    ref = omniglot_characters.images.astype(np.float32) / 255
    np.testing.assert_array_equal(splits.test[..., 0], ref[ids.test])
    np.testing.assert_array_equal(splits.val[..., 0], ref[ids.val])
    for i in (0, 537, 1099):
        for k in range(4):
            np.testing.assert_array_equal(
                splits.train[4 * i + k, ..., 0], np.rot90(ref[ids.train[i]], k, axes=(1, 2))
            )
    # No test/val character appears in train in any rotation (pixel-exact check).
    train_fp = set(_fingerprints(splits.train).tolist())
    assert len(train_fp) > 0.99 * 4400 * 20
    for held_out in (splits.test, splits.val):
        for k in range(4):
            rotated = np.rot90(held_out, k, axes=(2, 3))
            assert train_fp.isdisjoint(_fingerprints(rotated).tolist())


def test_lake_split(omniglot_characters, jaxmeta_cache_dir: Path) -> None:
    splits = omniglot.load("lake", cache_dir=jaxmeta_cache_dir, rotations=False)
    assert splits.val is None
    assert splits.train.shape == (964, 20, 28, 28, 1)
    assert splits.test.shape == (659, 20, 28, 28, 1)
    rotated = omniglot.load("lake", cache_dir=jaxmeta_cache_dir)
    assert rotated.train.shape == (3856, 20, 28, 28, 1)
    np.testing.assert_array_equal(rotated.test, splits.test)  # test never rotated
    np.testing.assert_array_equal(rotated.train[::4], splits.train)
    train_fp = set(_fingerprints(rotated.train).tolist())
    for k in range(4):
        assert train_fp.isdisjoint(_fingerprints(np.rot90(splits.test, k, axes=(2, 3))).tolist())


# ----------------------------------------------------------------------------------------
# Folder episodes.
# ----------------------------------------------------------------------------------------


def _write_png(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("L", size, 255)
    img.paste(0, box)
    img.save(path)


def _make_episode_dirs(root: Path) -> tuple[Path, Path]:
    support, query = root / "support", root / "query"
    _write_png(support / "b_circle" / "s1.png", (105, 105), (0, 0, 50, 50))
    _write_png(support / "b_circle" / "s2.PNG", (60, 60), (0, 0, 30, 30))
    _write_png(support / "a_line" / "s1.png", (105, 105), (50, 50, 105, 105))
    Image.new("RGB", (40, 40), "white").save(support / "a_line" / "s2.jpg")
    (support / "a_line" / "notes.txt").write_text("ignored")
    _write_png(query / "a_line" / "q1.png", (105, 105), (50, 50, 105, 105))
    _write_png(query / "b_circle" / "q1.png", (28, 28), (0, 0, 14, 14))
    _write_png(query / "b_circle" / "q2.png", (105, 105), (0, 0, 50, 50))
    Image.new("RGB", (30, 30), "black").save(query / "b_circle" / "q3.jpeg")
    return support, query


def test_folder_episode(tmp_path: Path) -> None:
    support, query = _make_episode_dirs(tmp_path)
    task, names, paths = load_folder_episode(support, query, omniglot.preprocess_image)
    assert names == ["a_line", "b_circle"]
    (sx, sy), (qx, qy) = task
    assert sx.shape == (4, 28, 28, 1) and qx.shape == (4, 28, 28, 1)
    assert sx.dtype == np.float32 and sy.dtype == np.int32
    np.testing.assert_array_equal(sy, [0, 0, 1, 1])
    np.testing.assert_array_equal(qy, [0, 1, 1, 1])
    assert paths == ["a_line/q1.png", "b_circle/q1.png", "b_circle/q2.png", "b_circle/q3.jpeg"]
    assert qx[3].min() > 0.95  # an all-black jpeg is all ink
    np.testing.assert_array_equal(qx[1, :14, :14], 1.0)  # 28x28 input: no resampling
    assert sx[1].max() == 0.0  # the blank white jpg has no ink
    assert sx[2, 0, 0, 0] == 1.0 and sx[2, 27, 27, 0] == 0.0  # ink top-left for b_circle
    np.testing.assert_array_equal(sx[2], qx[2])  # same drawing, same preprocessing


def test_folder_episode_errors(tmp_path: Path) -> None:
    support, query = _make_episode_dirs(tmp_path)
    with pytest.raises(DataError, match="support directory not found") as e:
        load_folder_episode(tmp_path / "nope", query, omniglot.preprocess_image)
    assert str(tmp_path / "nope") in _one_line(e)
    # Classes differ.
    _write_png(query / "c_extra" / "q.png", (28, 28), (0, 0, 5, 5))
    differ = r"classes differ: only in support \[\], only in query \['c_extra'\]"
    with pytest.raises(DataError, match=differ) as e:
        load_folder_episode(support, query, omniglot.preprocess_image)
    _one_line(e)
    # A class folder with no images.
    (support / "c_extra").mkdir()
    with pytest.raises(DataError, match="no images") as e:
        load_folder_episode(support, query, omniglot.preprocess_image)
    assert str(support / "c_extra") in _one_line(e)
    # An unreadable image.
    (support / "c_extra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="unreadable image") as e:
        load_folder_episode(support, query, omniglot.preprocess_image)
    assert str(support / "c_extra" / "broken.png") in _one_line(e)
    # No class folders at all.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_folder_episode(empty, query, omniglot.preprocess_image)
