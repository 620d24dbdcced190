"""Tests for jaxmeta.data.miniimagenet on tiny synthetic data sets in both layouts."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxmeta.data import miniimagenet as mi
from jaxmeta.errors import DataError, JaxmetaWarning
from miniimagenet_fixtures import make_synthetic_miniimagenet, synthetic_images

REPO_ROOT = Path(__file__).resolve().parents[1]

# The synthetic sets are deliberately not 64/16/20 classes; that warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore:Mini-ImageNet .* split has .* classes")

CLASSES = (6, 3, 3)
PER_CLASS = 20


@pytest.fixture(scope="module")
def expected() -> dict[str, tuple[list[str], np.ndarray]]:
    return synthetic_images(CLASSES, PER_CLASS, seed=0)


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini_csv")
    return make_synthetic_miniimagenet(root, "csv", CLASSES, PER_CLASS)


@pytest.fixture(scope="module")
def pkl_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini_pkl")
    return make_synthetic_miniimagenet(root, "pickle", CLASSES, PER_CLASS)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mi.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv("JAXMETA_CACHE_DIR", raising=False)


def _copy_tree(src: Path, dst: Path) -> Path:
    """Copies a (flat or one-level) synthetic data set so a test may modify it."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_dir():
            (dst / item.name).mkdir()
            for f in item.iterdir():
                (dst / item.name / f.name).write_bytes(f.read_bytes())
        else:
            (dst / item.name).write_bytes(item.read_bytes())
    return dst


def _assert_matches(splits: mi.MiniImageNetSplits, expected: dict) -> None:
    assert isinstance(splits, mi.MiniImageNetSplits)
    for split, arr in zip(mi.SPLITS, splits):
        assert isinstance(arr, np.ndarray)
        assert arr.dtype == np.uint8
        assert arr.shape == (len(expected[split][0]), PER_CLASS, 84, 84, 3)
        np.testing.assert_array_equal(arr, expected[split][1])


# ----------------------------------------------------------------------------- layouts


def test_detects_each_layout(csv_root: Path, pkl_root: Path, tmp_path: Path) -> None:
    assert mi.detect_layout(csv_root) == "csv"
    assert mi.detect_layout(pkl_root) == "pickle"
    # Both present: the CSV layout (no unpickling needed) wins.
    both = _copy_tree(csv_root, tmp_path / "both")
    for name in mi.PICKLE_FILES:
        (both / name).write_bytes((pkl_root / name).read_bytes())
    assert mi.detect_layout(both) == "csv"


@pytest.mark.parametrize("layout", ["csv", "pickle"])
def test_load_shapes_dtypes_and_content(
    layout: str, csv_root: Path, pkl_root: Path, expected: dict, tmp_path: Path
) -> None:
    root = csv_root if layout == "csv" else pkl_root
    splits = mi.load(data_dir=root, cache_dir=tmp_path / "cache")
    _assert_matches(splits, expected)
    # Every class is distinguishable (distinct mean colour), so learning is possible.
    means = splits.train.reshape(CLASSES[0], -1, 3).mean(axis=1)
    dists = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert np.min(dists + 1e3 * np.eye(CLASSES[0])) > 5


def test_both_layouts_identical(csv_root: Path, pkl_root: Path, tmp_path: Path) -> None:
    a = mi.load(data_dir=csv_root, cache_dir=tmp_path / "c1")
    b = mi.load(data_dir=pkl_root, cache_dir=tmp_path / "c2")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_images_in_label_subfolders_and_resizing(tmp_path: Path) -> None:
    root = make_synthetic_miniimagenet(
        tmp_path / "big", "csv", (2, 1, 1), 20, seed=3, image_size=100
    )
    # Move the val images into images/<label>/ (a layout some copies use).
    with open(root / "val.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    for filename, label in rows:
        (root / "images" / label).mkdir(exist_ok=True)
        os.replace(root / "images" / filename, root / "images" / label / filename)
    splits = mi.load(data_dir=root, cache_dir=tmp_path / "cache")
    truth = synthetic_images((2, 1, 1), 20, seed=3, image_size=100)
    for split, arr in zip(mi.SPLITS, splits):
        want = np.stack(
            [
                np.stack([mi.preprocess_image(Image.fromarray(im)) for im in cls])
                for cls in truth[split][1]
            ]
        )
        np.testing.assert_array_equal(arr, want)


# ----------------------------------------------------------------------------- caching


def test_cache_second_load_reads_cache(
    csv_root: Path, expected: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = mi.load(data_dir=csv_root, cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    (npz,) = [f for f in files if f.endswith(".npz")]
    assert npz.startswith("miniimagenet-csv-")
    assert set(files) == {npz, npz + ".manifest.json", npz + ".lock"}

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("preprocessed again instead of reading the cache")

    monkeypatch.setattr(mi, "_build", fail)
    second = mi.load(data_dir=csv_root, cache_dir=cache)
    _assert_matches(second, expected)
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    assert sorted(p.name for p in cache.iterdir()) == files  # no temporary files left


def test_cache_key_follows_source(pkl_root: Path, csv_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    mi.load(data_dir=pkl_root, cache_dir=cache)
    mi.load(data_dir=csv_root, cache_dir=cache)
    names = {p.name for p in cache.glob("*.npz")}
    assert len(names) == 2
    assert any("-pickle-" in n for n in names) and any("-csv-" in n for n in names)
    # A different source (other images) gets its own cache entry, not a stale one.
    other = make_synthetic_miniimagenet(tmp_path / "other", "pickle", CLASSES, PER_CLASS + 1)
    splits = mi.load(data_dir=other, cache_dir=cache)
    assert splits.train.shape[1] == PER_CLASS + 1
    assert len(list(cache.glob("*.npz"))) == 3


def test_same_sizes_other_bytes_get_their_own_cache(csv_root: Path, expected: dict, tmp_path: Path) -> None:
    """The key holds the SHA-256 of the files, not just their names and sizes."""
    cache = tmp_path / "cache"
    mi.load(data_dir=csv_root, cache_dir=cache)
    other = _copy_tree(csv_root, tmp_path / "other")
    image = sorted((other / "images").iterdir())[0]
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF  # same name, same size, other bytes
    image.write_bytes(bytes(data))
    assert mi.source_identity(other)["files"]["images/"]["size"] == mi.source_identity(csv_root)["files"]["images/"]["size"]
    assert mi.source_identity(other)["digest"] != mi.source_identity(csv_root)["digest"]
    mi.load(data_dir=other, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["replace", "truncate", "flip"])
def test_damaged_cache_is_detected_and_rebuilt(damage: str, pkl_root: Path, expected: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    mi.load(data_dir=pkl_root, cache_dir=cache)
    (path,) = cache.glob("*.npz")
    data = bytearray(path.read_bytes())
    if damage == "replace":
        data = bytearray(b"not a zip file")
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:  # one pixel of the uncompressed arrays: np.load would read it without complaint
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(JaxmetaWarning, match=r"Mini-ImageNet cache .* is damaged \(.*\); rebuilding it"):
        splits = mi.load(data_dir=pkl_root, cache_dir=cache)
    _assert_matches(splits, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", JaxmetaWarning)  # rebuilt: read back without a warning
        _assert_matches(mi.load(data_dir=pkl_root, cache_dir=cache), expected)


_PREPARE = """
import logging, sys, time
import numpy as np
logging.basicConfig(level=logging.INFO, format="%(message)s")
from jaxmeta.data import miniimagenet as mi
start = float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # both processes start together
splits = mi.load(data_dir=sys.argv[1], cache_dir=sys.argv[2])
print("sum", int(sum(int(a.astype(np.int64).sum()) for a in splits)))
"""


def test_two_processes_prepare_one_cache(csv_root: Path, expected: dict, tmp_path: Path) -> None:
    """Started at the same moment on an empty cache: one builds, the other waits and reads."""
    cache = tmp_path / "cache"
    start = time.time() + 8.0  # after both interpreters have imported numpy and PIL
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, str(csv_root), str(cache), str(start)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    sums = {out.split()[-1] for out, _ in outs}
    want = sum(int(a.astype(np.int64).sum()) for _, a in expected.values())
    assert sums == {str(want)}
    builds = sum(err.count("preparing Mini-ImageNet cache") for _, err in outs)
    assert builds == 1, [err[-1000:] for _, err in outs]
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]  # nothing half-written left


def test_env_vars(
    pkl_root: Path, expected: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(mi.DATA_DIR_ENV, str(pkl_root))
    monkeypatch.setenv("JAXMETA_CACHE_DIR", str(tmp_path / "envcache"))
    _assert_matches(mi.load(), expected)
    assert len(list((tmp_path / "envcache").glob("miniimagenet-pickle-*.npz"))) == 1
    # An explicit argument beats the environment.
    assert mi.resolve_data_dir(tmp_path) == tmp_path


# ----------------------------------------------------------------------------- errors


def test_no_layout_error_lists_both_layouts(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("filename,label\n")
    with pytest.raises(DataError) as info:
        mi.load(data_dir=tmp_path, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "\n" not in msg
    for name in (*mi.CSV_FILES, "images/", *mi.PICKLE_FILES):
        assert name in msg
    assert "missing: val.csv, test.csv, images/" in msg


def test_no_directory_given_or_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=mi.DATA_DIR_ENV):
        mi.load(cache_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist.*mini-imagenet-cache-train.pkl"):
        mi.load(data_dir=tmp_path / "nope", cache_dir=tmp_path)


def test_missing_image_names_the_file(csv_root: Path, tmp_path: Path) -> None:
    root = _copy_tree(csv_root, tmp_path / "data")
    with open(root / "test.csv", newline="") as f:
        victim = list(csv.reader(f))[5][0]
    (root / "images" / victim).unlink()
    with pytest.raises(DataError, match=f"missing image .*{victim}.*test.csv:6"):
        mi.load(data_dir=root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "text, match",
    [
        ("file,class\na.png,n1\n", "expected header 'filename,label'"),
        ("", "expected header"),
        ("filename,label\na.png\n", "line 2"),
        ("filename,label\na.png,n1,extra\n", "line 2"),
        ("filename,label\n", "no images listed"),
        ("filename,label\n../../etc/passwd,n1\n", "unsafe filename"),
    ],
)
def test_malformed_csv(text: str, match: str, csv_root: Path, tmp_path: Path) -> None:
    root = _copy_tree(csv_root, tmp_path / "data")
    (root / "val.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        mi.load(data_dir=root, cache_dir=tmp_path / "cache")


def test_undecodable_image(csv_root: Path, tmp_path: Path) -> None:
    root = _copy_tree(csv_root, tmp_path / "data")
    with open(root / "val.csv", newline="") as f:
        victim = list(csv.reader(f))[1][0]
    (root / "images" / victim).write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"cannot decode image .*{victim}"):
        mi.load(data_dir=root, cache_dir=tmp_path / "cache")


def _rewrite_pickle(path: Path, edit) -> None:  # noqa: ANN001
    with open(path, "rb") as f:
        obj = pickle.load(f)
    edit(obj)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_unequal_classes_truncated_with_warning(tmp_path: Path) -> None:
    root = make_synthetic_miniimagenet(tmp_path / "d", "pickle", (2, 1, 1), 22)
    _rewrite_pickle(root / mi.PICKLE_FILES[0], lambda o: o["class_dict"]["n10000001"].pop())
    with pytest.warns(UserWarning, match="truncating every class to 21.*n10000001"):
        splits = mi.load(data_dir=root, cache_dir=tmp_path / "cache")
    assert splits.train.shape == (2, 21, 84, 84, 3)
    assert splits.val.shape == splits.test.shape == (1, 22, 84, 84, 3)
    truth = synthetic_images((2, 1, 1), 22)
    np.testing.assert_array_equal(splits.train, truth["train"][1][:, :21])


def test_too_few_examples_is_an_error(tmp_path: Path) -> None:
    root = make_synthetic_miniimagenet(tmp_path / "d", "pickle", (2, 1, 1), 20)
    _rewrite_pickle(root / mi.PICKLE_FILES[2], lambda o: o["class_dict"]["n30000000"].pop())
    with pytest.raises(DataError, match="n30000000.* has 19 images; at least 20"):
        mi.load(data_dir=root, cache_dir=tmp_path / "cache")


def test_nonstandard_class_counts_warn(pkl_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="train split has 6 classes; the standard split has 64"):
        mi.load(data_dir=pkl_root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda o: o.pop("class_dict"), "expected a dict with keys"),
        (lambda o: o.update(image_data=o["image_data"][:, :80]), r"uint8 array \[n, 84, 84, 3\]"),
        (lambda o: o.update(image_data=o["image_data"].astype(np.float32)), "float32"),
        (lambda o: o["class_dict"].update(n10000000=[0] * 19 + [10**6]), "outside image_data"),
        (lambda o: o["class_dict"].update(n10000000=["a"] * 20), "not a list of integers"),
    ],
)
def test_malformed_pickle(edit, match: str, tmp_path: Path) -> None:  # noqa: ANN001
    root = make_synthetic_miniimagenet(tmp_path / "d", "pickle", (2, 1, 1), 20)
    _rewrite_pickle(root / mi.PICKLE_FILES[0], edit)
    with pytest.raises(DataError, match=match):
        mi.load(data_dir=root, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- pickle safety


class _Reduce:
    """Pickles as ``fn(*args)``: what a malicious pickle runs on a plain ``pickle.load``."""

    def __init__(self, fn: object, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, _Reduce]:
    return {
        "posix.system": _Reduce(os.system, (f"touch '{marker}'",)),
        "builtins.exec": _Reduce(exec, (f"open({str(marker)!r}, 'w').close()",)),
        "builtins.eval": _Reduce(eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": _Reduce(subprocess.Popen, (["touch", str(marker)],)),
    }


@pytest.mark.parametrize(
    "name", ["posix.system", "builtins.exec", "builtins.eval", "subprocess.Popen"]
)
def test_malicious_pickle_refused(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[name]
    images = np.zeros((1, 84, 84, 3), np.uint8)
    data = pickle.dumps({"image_data": images, "class_dict": {"x": payload}})
    assert name.split(".")[1].encode() in data
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(DataError, match=f"refusing to unpickle global '{name}'"):
        mi.load_pickle_restricted(path)
    time.sleep(0.05)  # a spawned process would have had time to create the marker
    assert not marker.exists()


def test_malicious_pickle_refused_through_load(pkl_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    root = _copy_tree(pkl_root, tmp_path / "data")
    (root / mi.PICKLE_FILES[1]).write_bytes(pickle.dumps(_payloads(marker)["builtins.exec"]))
    refused = r"mini-imagenet-cache-val\.pkl: refusing .*'builtins\.exec'"
    with pytest.raises(DataError, match=refused):
        mi.load(data_dir=root, cache_dir=tmp_path / "cache")
    assert not marker.exists()
    # Control: the same bytes do run code under a plain pickle.load.
    pickle.loads((root / mi.PICKLE_FILES[1]).read_bytes())
    assert marker.exists()


def test_codecs_encode_only_latin1(tmp_path: Path) -> None:
    # Protocol 2: _codecs.encode("a", "utf_8") -- allowed global, refused arguments.
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf_8\x86R.")
    with pytest.raises(DataError, match="only latin1"):
        mi.load_pickle_restricted(path)
    path.write_bytes(b"\x80\x02cbuiltins\ngetattr\n.")
    with pytest.raises(DataError, match="'builtins.getattr'"):
        mi.load_pickle_restricted(path)


def _cache_dict() -> dict:
    rng = np.random.default_rng(0)
    return {
        "image_data": rng.integers(0, 256, (3, 84, 84, 3), dtype=np.uint8),
        "class_dict": {"a": [np.int64(0), 2], "b": np.array([1], np.int32)},
    }


def _check_roundtrip(obj: object) -> None:
    want = _cache_dict()
    assert isinstance(obj, dict)
    np.testing.assert_array_equal(obj["image_data"], want["image_data"])
    assert obj["image_data"].dtype == np.uint8
    assert [int(i) for i in obj["class_dict"]["a"]] == [0, 2]
    np.testing.assert_array_equal(obj["class_dict"]["b"], [1])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_reads_numpy_pickles(protocol: int, tmp_path: Path) -> None:
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(_cache_dict(), protocol=protocol))
    _check_roundtrip(mi.load_pickle_restricted(path))


def test_restricted_unpickler_reads_numpy1_and_numpy2_names(tmp_path: Path) -> None:
    data = pickle.dumps(_cache_dict(), protocol=2)  # GLOBAL opcodes: "module\nname\n"
    if b"numpy._core." in data:  # written by numpy 2: hand-craft the numpy 1 names
        new, old = data, data.replace(b"cnumpy._core.", b"cnumpy.core.")
    else:  # written by numpy 1: hand-craft the numpy 2 names
        old, new = data, data.replace(b"cnumpy.core.", b"cnumpy._core.")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in old and b"numpy._core" not in old
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in new and b"numpy.core." not in new
    assert b"multiarray\nscalar\n" in old and b"multiarray\nscalar\n" in new
    for i, blob in enumerate((old, new)):
        path = tmp_path / f"{i}.pkl"
        path.write_bytes(blob)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no numpy.core deprecation warning either
            _check_roundtrip(mi.load_pickle_restricted(path))


def test_legacy_names_through_load(csv_root: Path, tmp_path: Path) -> None:
    root = make_synthetic_miniimagenet(
        tmp_path / "d", "pickle", CLASSES, PER_CLASS, pickle_protocol=2
    )
    for name in mi.PICKLE_FILES:
        blob = (root / name).read_bytes().replace(b"cnumpy._core.", b"cnumpy.core.")
        (root / name).write_bytes(blob)
    a = mi.load(data_dir=root, cache_dir=tmp_path / "c1")
    b = mi.load(data_dir=csv_root, cache_dir=tmp_path / "c2")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_corrupt_pickle(tmp_path: Path) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a valid pickle"):
        mi.load_pickle_restricted(path)


# ----------------------------------------------------------------------------- images


def test_preprocess_image_modes_and_sizes() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
    out = mi.preprocess_image(Image.fromarray(rgb))
    assert out.dtype == np.uint8 and out.shape == (84, 84, 3)
    np.testing.assert_array_equal(out, rgb)  # already 84x84 RGB: unchanged
    assert out.flags.writeable  # a fresh array, not a read-only view of PIL memory
    for img in (
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (100, 60), dtype=np.uint8), mode="L"),
        Image.fromarray(rng.integers(0, 256, (90, 90, 4), dtype=np.uint8), mode="RGBA"),
        Image.new("P", (200, 150)),
    ):
        out = mi.preprocess_image(img)
        assert out.dtype == np.uint8 and out.shape == (84, 84, 3)
    flat = mi.preprocess_image(Image.new("RGB", (300, 200), (10, 200, 30)))
    assert np.all(flat == np.array([10, 200, 30], np.uint8))
    with pytest.raises(TypeError):
        mi.preprocess_image(rgb)  # type: ignore[arg-type]


def test_normalize_numpy_and_jax() -> None:
    import jax
    import jax.numpy as jnp

    x = np.random.default_rng(0).integers(0, 256, (2, 5, 84, 84, 3), dtype=np.uint8)
    mean, std = np.array(mi.IMAGENET_MEAN), np.array(mi.IMAGENET_STD)
    want = ((x / 255.0 - mean) / std).astype(np.float32)

    out_np = mi.normalize(x)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == x.shape
    np.testing.assert_allclose(out_np, want, rtol=1e-5, atol=1e-5)

    out_jax = jax.jit(mi.normalize)(jnp.asarray(x))
    assert isinstance(out_jax, jax.Array) and out_jax.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_jax), want, rtol=1e-5, atol=1e-5)

    unit = mi.normalize(x, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    np.testing.assert_allclose(unit, x / 255.0, rtol=1e-6, atol=1e-6)
    assert unit.min() >= 0.0 and unit.max() <= 1.0
    with pytest.raises(TypeError, match="uint8"):
        mi.normalize(out_np)
