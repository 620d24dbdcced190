"""Mini-ImageNet from a user-supplied copy (it is not in TFDS and cannot be downloaded here).

Two on-disk layouts are recognised in the data directory (``data_dir`` argument, else
the ``JAXMETA_MINIIMAGENET_DIR`` environment variable):

* **Ravi & Larochelle CSV layout**: ``train.csv``, ``val.csv`` and ``test.csv``, each with
  the header ``filename,label``, plus an ``images/`` folder holding the files (looked up
  as ``images/<filename>``, falling back to ``images/<label>/<filename>``).  Images of any
  size and mode are converted to RGB and resized to 84x84 with Lanczos resampling, as in
  the original Ravi & Larochelle preprocessing script (see :func:`preprocess_image`).
* **Pickled caches**: ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict holding
  ``image_data`` (uint8 ``[n, 84, 84, 3]``) and ``class_dict`` (class name -> list of
  indices into ``image_data``).  They are read with a *restricted* unpickler that only
  admits numpy array reconstruction and plain containers, because a pickle from a
  stranger can otherwise run arbitrary code (see :func:`load_pickle_restricted`).

If both layouts are present the CSV layout wins (it needs no unpickling).

Within a split, classes are sorted by name (the WordNet id), and the images of a class
keep their order (CSV row order, or ``class_dict`` index order), so both layouts of the
same data give identical arrays.  Classes with more images than the smallest class of
their split are truncated to that size (with a warning), so each split is one dense
``uint8`` array ``[classes, examples_per_class, 84, 84, 3]``.  Images stay ``uint8``
(the standard float32 copy would need about 3.2 GB for the train split alone); apply
:func:`normalize` after gathering an episode, on device.

The preprocessed splits are cached as an uncompressed ``.npz`` in the cache directory
(``cache_dir`` argument, else ``JAXMETA_CACHE_DIR``, else ``~/.cache/jaxmeta``), written
atomically via a temporary file and ``os.replace``, under a file lock (concurrent
processes preprocess once), with a manifest of its SHA-256 that every load checks (a
damaged cache is rebuilt with a warning).  The cache file name holds the layout and a
digest of the source files' names, sizes and SHA-256 (:func:`source_identity`), so a
changed data set is preprocessed again.
"""

from __future__ import annotations

import concurrent.futures
import csv
import importlib
import os
import pickle
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Literal, NamedTuple

import numpy as np

from jaxmeta.data import provenance
from jaxmeta.errors import DataError, missing_extra

try:
    from PIL import Image
except ImportError as e:
    raise missing_extra(e, "miniimagenet", "Mini-ImageNet") from None

__all__ = [
    "CACHE_DIR_ENV",
    "CSV_FILES",
    "DATA_DIR_ENV",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SIZE",
    "MIN_EXAMPLES_PER_CLASS",
    "MiniImageNetSplits",
    "PICKLE_FILES",
    "SPLITS",
    "STANDARD_CLASSES",
    "STANDARD_EXAMPLES_PER_CLASS",
    "detect_layout",
    "load",
    "load_pickle_restricted",
    "normalize",
    "preprocess_image",
    "resolve_cache_dir",
    "resolve_data_dir",
    "source_identity",
]

Layout = Literal["csv", "pickle"]

IMAGE_SIZE = 84
"""Side length of the preprocessed square RGB images."""

SPLITS = ("train", "val", "test")
STANDARD_CLASSES = {"train": 64, "val": 16, "test": 20}
"""Class counts of the standard Ravi & Larochelle split (other counts only warn)."""

STANDARD_EXAMPLES_PER_CLASS = 600
MIN_EXAMPLES_PER_CLASS = 20
"""Fewest images a class may have; fewer is a :class:`~jaxmeta.errors.DataError`."""

DATA_DIR_ENV = "JAXMETA_MINIIMAGENET_DIR"
CACHE_DIR_ENV = "JAXMETA_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/jaxmeta")

CSV_FILES = tuple(f"{split}.csv" for split in SPLITS)
IMAGES_DIR = "images"
PICKLE_FILES = tuple(f"mini-imagenet-cache-{split}.pkl" for split in SPLITS)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB images in [0, 1] (the usual torchvision values)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB images in [0, 1]."""

_RESAMPLE = Image.Resampling.LANCZOS
# Bump when preprocessing or the cache format changes, so old caches are not reused.
_CACHE_VERSION = "miniimagenet-v1-lanczos84-uint8"

_EXPECTED = (
    f"expected either {', '.join(CSV_FILES)} (header 'filename,label') plus an "
    f"{IMAGES_DIR}/ folder (Ravi & Larochelle layout), or {', '.join(PICKLE_FILES)} "
    "(pickled caches)"
)


class MiniImageNetSplits(NamedTuple):
    """The three Mini-ImageNet splits, each ``uint8 [classes, examples, 84, 84, 3]``.

    Attributes:
      train: Meta-training classes (64 in the standard split).
      val: Meta-validation classes (16 in the standard split).
      test: Meta-test classes (20 in the standard split).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


# --------------------------------------------------------------------------- images


def preprocess_image(img: Image.Image) -> np.ndarray:
    """Turns a PIL image into a Mini-ImageNet input.

    The image is converted to RGB (dropping any alpha channel, expanding greyscale and
    palettes) and, unless it already is 84x84, resized to 84x84 with Lanczos resampling
    (non-square images are squashed, not cropped), as in the Ravi & Larochelle script.
    Use it for the CSV layout and for a user's own episode images alike.

    Args:
      img: Any PIL image.

    Returns:
      A new ``uint8`` array of shape ``[84, 84, 3]``.

    Raises:
      TypeError: If ``img`` is not a PIL image.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL.Image.Image, got {type(img).__name__}")
    rgb = img.convert("RGB")
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), resample=_RESAMPLE)
    return np.array(rgb, dtype=np.uint8)


def normalize(
    x: Any,
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Any:
    """Maps ``uint8`` images to normalised ``float32``: ``(x / 255 - mean) / std``.

    Works on numpy and jax arrays alike (including tracers inside ``jit``), so it can be
    applied on device after an episode has been gathered; the result has the same array
    type and shape as ``x``.  The defaults are the usual ImageNet statistics; pass
    ``mean=(0, 0, 0), std=(1, 1, 1)`` for plain ``[0, 1]`` scaling.

    Args:
      x: ``uint8`` array whose last axis is the RGB channel axis.
      mean: Per-channel mean, in [0, 1] units.
      std: Per-channel standard deviation, in [0, 1] units.

    Returns:
      A ``float32`` array of the same shape.

    Raises:
      TypeError: If ``x`` is not ``uint8`` (which usually means it was normalised twice).
    """
    if np.dtype(x.dtype) != np.uint8:
        raise TypeError(f"normalize expects uint8 images, got dtype {x.dtype}")
    std_arr = np.asarray(std, dtype=np.float32)
    scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
    shift = (-np.asarray(mean, dtype=np.float32) / std_arr).astype(np.float32)
    return x.astype(np.float32) * scale + shift


# --------------------------------------------------------------------------- pickles


def _numpy_core(submodule: str) -> Any:
    """Imports ``numpy._core.<submodule>`` (numpy 2) or ``numpy.core.<submodule>`` (numpy 1)."""
    package = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
    return importlib.import_module(f"{package}.{submodule}")


_LATIN1_NAMES = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"})


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` that only performs what pickle protocol 2 uses it for."""
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1_NAMES or errors != "strict":
        raise DataError(
            f"refusing _codecs.encode({type(obj).__name__}, {encoding!r}) in a pickle: "
            "only latin1 encoding of strings is allowed"
        )
    return obj.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Callable[[], Any]]:
    """The only globals a Mini-ImageNet pickle may reference, each mapped to a resolver.

    Both the numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) module names resolve
    to the installed numpy's objects, so either kind of pickle loads without importing
    the deprecated alias.
    """
    allowed: dict[tuple[str, str], Callable[[], Any]] = {
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2.
        ("_codecs", "encode"): lambda: _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        multiarray, numeric = f"{package}.multiarray", f"{package}.numeric"
        allowed[(multiarray, "_reconstruct")] = lambda: _numpy_core("multiarray")._reconstruct
        allowed[(multiarray, "scalar")] = lambda: _numpy_core("multiarray").scalar
        # Protocol 5 pickles of contiguous arrays.
        allowed[(numeric, "_frombuffer")] = lambda: _numpy_core("numeric")._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global outside :func:`_allowed_globals`."""

    _allowed = _allowed_globals()

    def __init__(self, file: Any, *, source: str) -> None:
        # latin1 keeps Python 2 byte strings (numpy array data) intact.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        resolver = self._allowed.get((module, name))
        if resolver is None:
            raise DataError(
                f"{self._source}: refusing to unpickle global '{module}.{name}': only numpy "
                "arrays and plain containers are allowed (the file may be malicious)"
            )
        return resolver()


def load_pickle_restricted(path: str | os.PathLike[str]) -> Any:
    """Unpickles a file while allowing only numpy arrays, dtypes, scalars and builtins.

    Plain containers, strings and numbers need no globals and load as usual; any other
    global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) is refused
    before it can be called.

    Args:
      path: The pickle file.

    Returns:
      The unpickled object.

    Raises:
      DataError: If the file cannot be read, is not a valid pickle, or references a
        global outside the allowed set (the message names it).
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            return _RestrictedUnpickler(f, source=source).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {source}: {e}") from e
    except Exception as e:  # pickle raises many types on corrupt input
        raise DataError(f"{source} is not a valid pickle: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- layout


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the Mini-ImageNet directory: ``data_dir``, else ``$JAXMETA_MINIIMAGENET_DIR``.

    Args:
      data_dir: Explicit directory, or ``None`` to use the environment variable.

    Returns:
      The directory (expanded, not checked).

    Raises:
      DataError: If neither is given.
    """
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV, "")
        if not env:
            raise DataError(
                f"no Mini-ImageNet directory: pass data_dir or set {DATA_DIR_ENV} to a folder "
                f"with your copy; {_EXPECTED}"
            )
        data_dir = env
    return Path(data_dir).expanduser()


def detect_layout(data_dir: str | os.PathLike[str]) -> Layout:
    """Tells which Mini-ImageNet layout ``data_dir`` holds.

    Args:
      data_dir: Directory to inspect.

    Returns:
      ``"csv"`` for the Ravi & Larochelle CSV layout (preferred when both are complete),
      ``"pickle"`` for the pickled caches.

    Raises:
      DataError: If the directory does not exist or holds neither layout completely; the
        one-line message lists the files both layouts need and what is missing.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"Mini-ImageNet directory {root} does not exist; {_EXPECTED}")
    csv_missing = [n for n in CSV_FILES if not (root / n).is_file()]
    if not (root / IMAGES_DIR).is_dir():
        csv_missing.append(f"{IMAGES_DIR}/")
    if not csv_missing:
        return "csv"
    pkl_missing = [n for n in PICKLE_FILES if not (root / n).is_file()]
    if not pkl_missing:
        return "pickle"
    raise DataError(
        f"no Mini-ImageNet data in {root}: {_EXPECTED} "
        f"(missing: {', '.join(csv_missing)}; or {', '.join(pkl_missing)})"
    )


# --------------------------------------------------------------------------- CSV layout


class _CsvImage(NamedTuple):
    """One image listed in a split's CSV, located on disk."""

    label: str
    path: Path
    size: int
    where: str  # "train.csv:12", for error messages


def _read_csv_split(root: Path, split: str) -> list[_CsvImage]:
    """Parses ``<split>.csv`` and locates (and sizes) every image it names."""
    csv_path = root / f"{split}.csv"
    rows: list[tuple[str, str, int]] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header] != ["filename", "label"]:
                raise DataError(
                    f"malformed CSV {csv_path}: expected header 'filename,label', got {header!r}"
                )
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise DataError(
                        f"malformed CSV {csv_path} line {reader.line_num}: expected "
                        f"'filename,label', got {row!r}"
                    )
                rows.append((row[0].strip(), row[1].strip(), reader.line_num))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read CSV {csv_path}: {e}") from e
    if not rows:
        raise DataError(f"malformed CSV {csv_path}: no images listed")

    images_dir = root / IMAGES_DIR
    out = []
    for filename, label, line in rows:
        rel = PurePosixPath(filename.replace("\\", "/"))
        where = f"{csv_path.name}:{line}"
        if rel.is_absolute() or ".." in rel.parts:
            raise DataError(f"malformed CSV {csv_path} line {line}: unsafe filename {filename!r}")
        candidates = (images_dir / rel, images_dir / label / rel)
        for path in candidates:
            try:
                size = path.stat().st_size
            except OSError:
                continue
            out.append(_CsvImage(label, path, size, where))
            break
        else:
            raise DataError(
                f"missing image {candidates[0]} (listed at {where} for class {label!r}; also "
                f"tried {candidates[1]})"
            )
    return out


def _decode(item: _CsvImage) -> np.ndarray:
    """Reads and preprocesses one listed image."""
    try:
        with Image.open(item.path) as img:
            return preprocess_image(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {item.path} (listed at {item.where}): {e}") from e


def _build_csv(listing: dict[str, list[_CsvImage]]) -> dict[str, np.ndarray]:
    """Decodes every listed image into ``split -> uint8 [classes, n, 84, 84, 3]``."""
    out = {}
    # PIL releases the GIL while decoding and resizing, so threads help on big copies.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    try:
        for split in SPLITS:
            by_class: dict[str, list[_CsvImage]] = {}
            for item in listing[split]:
                by_class.setdefault(item.label, []).append(item)
            classes = sorted(by_class)
            n = _examples_per_class(split, {c: len(by_class[c]) for c in classes})
            flat = [item for c in classes for item in by_class[c][:n]]
            arr = np.empty((len(classes) * n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            for i, image in enumerate(pool.map(_decode, flat)):
                arr[i] = image
            out[split] = arr.reshape(len(classes), n, IMAGE_SIZE, IMAGE_SIZE, 3)
    finally:
        # On a bad image, do not decode the rest of the queue before reporting it.
        pool.shutdown(wait=True, cancel_futures=True)
    return out


# --------------------------------------------------------------------------- pickle layout


def _split_from_pickle(path: Path, split: str) -> np.ndarray:
    """Reads and validates one pickled cache into ``uint8 [classes, n, 84, 84, 3]``."""
    obj = load_pickle_restricted(path)
    if not isinstance(obj, dict) or "image_data" not in obj or "class_dict" not in obj:
        raise DataError(f"{path}: expected a dict with keys 'image_data' and 'class_dict'")
    images, class_dict = obj["image_data"], obj["class_dict"]
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3)
    ):
        if isinstance(images, np.ndarray):
            desc = f"{images.dtype} {images.shape}"
        else:
            desc = type(images).__name__
        raise DataError(f"{path}: image_data must be a uint8 array [n, 84, 84, 3], got {desc}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"{path}: class_dict must be a non-empty dict of class name -> indices")
    indices: dict[str, np.ndarray] = {}
    for name, idx in class_dict.items():
        key = name.decode("latin1") if isinstance(name, bytes) else str(name)
        try:
            arr = np.asarray(idx)
        except Exception as e:
            raise DataError(f"{path}: class {key!r} indices are not a list of integers") from e
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"{path}: class {key!r} indices are not a list of integers")
        if arr.size and (arr.min() < 0 or arr.max() >= len(images)):
            raise DataError(
                f"{path}: class {key!r} has indices outside image_data (n={len(images)})"
            )
        if key in indices:
            raise DataError(f"{path}: duplicate class name {key!r}")
        indices[key] = arr.astype(np.int64)
    classes = sorted(indices)
    n = _examples_per_class(split, {c: len(indices[c]) for c in classes})
    gather = np.concatenate([indices[c][:n] for c in classes])
    return images[gather].reshape(len(classes), n, IMAGE_SIZE, IMAGE_SIZE, 3)


# --------------------------------------------------------------------------- shared


def _examples_per_class(split: str, counts: dict[str, int]) -> int:
    """Smallest class size in a split; warns when larger classes will be truncated."""
    if not counts:
        raise DataError(f"Mini-ImageNet {split} split has no classes")
    smallest = min(counts, key=counts.__getitem__)
    n = counts[smallest]
    if n < MIN_EXAMPLES_PER_CLASS:
        raise DataError(
            f"Mini-ImageNet {split} class {smallest!r} has {n} images; at least "
            f"{MIN_EXAMPLES_PER_CLASS} per class are needed"
        )
    if any(c != n for c in counts.values()):
        warnings.warn(
            f"Mini-ImageNet {split} classes have {n} to {max(counts.values())} images; "
            f"truncating every class to {n} (class {smallest!r} is the smallest)",
            stacklevel=2,
        )
    return n


def _check_splits(splits: MiniImageNetSplits) -> None:
    """Warns when the class counts differ from the standard 64/16/20."""
    for split, arr in zip(SPLITS, splits):
        if arr.shape[0] != STANDARD_CLASSES[split]:
            warnings.warn(
                f"Mini-ImageNet {split} split has {arr.shape[0]} classes; the standard split "
                f"has {STANDARD_CLASSES[split]}",
                stacklevel=2,
            )


def _source(root: Path, layout: Layout) -> tuple[dict, dict[str, list[_CsvImage]] | None]:
    """The source files' identity (names, sizes, SHA-256); also the parsed CSV listing."""
    listing = None
    if layout == "csv":
        listing = {split: _read_csv_split(root, split) for split in SPLITS}
        files = {name: provenance.file_entry(root / name) for name in CSV_FILES}
        images = {item.path for split in SPLITS for item in listing[split]}
        files[f"{IMAGES_DIR}/"] = provenance.tree_entry(root, images)
    else:
        files = {name: provenance.file_entry(root / name) for name in PICKLE_FILES}
    ident = provenance.identity("miniimagenet", files, source=f"{root.resolve()} ({layout} layout)",
                                version=f"{_CACHE_VERSION}-{layout}")
    return ident, listing


def source_identity(data_dir: str | os.PathLike[str] | None = None) -> dict:
    """The identity of the Mini-ImageNet copy in ``data_dir`` (else ``$JAXMETA_MINIIMAGENET_DIR``).

    The SHA-256 of each pickle, or of each CSV and of every image they list (one
    entry over the whole ``images/`` tree), as :func:`jaxmeta.data.provenance.identity`.

    Raises:
      DataError: no directory, no layout, or unreadable files.
    """
    root = resolve_data_dir(data_dir)
    return _source(root, detect_layout(root))[0]


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns ``cache_dir``, else ``$JAXMETA_CACHE_DIR``, else ``~/.cache/jaxmeta``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def _read_cache(path: Path) -> MiniImageNetSplits:
    """Loads a cache file that matched its manifest's SHA-256."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = [z[split] for split in SPLITS]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"unreadable Mini-ImageNet cache {path} ({e}); delete it to rebuild") from None
    for arr in arrays:
        if arr.dtype != np.uint8 or arr.ndim != 5 or arr.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise DataError(f"malformed Mini-ImageNet cache {path}; delete it to rebuild")
    return MiniImageNetSplits(*arrays)


def _write_cache(splits: MiniImageNetSplits, path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, **splits._asdict())


def _build(
    root: Path, layout: Layout, listing: dict[str, list[_CsvImage]] | None
) -> MiniImageNetSplits:
    """Preprocesses the source files into the three dense uint8 split arrays."""
    if layout == "csv":
        assert listing is not None
        arrays = _build_csv(listing)
        return MiniImageNetSplits(*(arrays[s] for s in SPLITS))
    return MiniImageNetSplits(
        *(_split_from_pickle(root / name, split) for split, name in zip(SPLITS, PICKLE_FILES))
    )


def load(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MiniImageNetSplits:
    """Loads Mini-ImageNet, preprocessing it once and caching the result.

    Args:
      data_dir: Directory with the CSV layout or the pickled caches; defaults to
        ``$JAXMETA_MINIIMAGENET_DIR``.
      cache_dir: Where the preprocessed ``.npz`` lives; defaults to
        ``$JAXMETA_CACHE_DIR``, else ``~/.cache/jaxmeta``.

    Returns:
      The ``(train, val, test)`` splits, each ``uint8 [classes, examples, 84, 84, 3]``
      with classes sorted by name.  Warns if the class counts are not 64/16/20 or if
      classes were truncated to the smallest class of their split.

    Raises:
      DataError: If no layout is found, a CSV is malformed or names a missing or
        undecodable image, a pickle is malformed or refused, or a class has fewer than
        20 images.
    """
    root = resolve_data_dir(data_dir)
    layout = detect_layout(root)
    source, listing = _source(root, layout)
    cache_path = resolve_cache_dir(cache_dir) / f"miniimagenet-{layout}-{source['digest'][:16]}.npz"
    splits = provenance.cached(cache_path, build=lambda: _build(root, layout, listing), write=_write_cache,
                               read=_read_cache, what="Mini-ImageNet", source=source)
    _check_splits(splits)
    return splits
