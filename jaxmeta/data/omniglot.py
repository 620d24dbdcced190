"""Omniglot through TFDS: local-archive preparation, 28x28 cache and character splits.

Pipeline:

1. **Prepare** (once, needs TensorFlow): :class:`LocalOmniglot` subclasses TFDS's own
   ``omniglot`` builder and, when given a directory of the original archives
   (``images_background.zip``, ``images_evaluation.zip``, ``images_background_small1.zip``,
   ``images_background_small2.zip``), safely extracts them instead of downloading, so
   TFDS's registered checksums are not needed. Without a directory it falls back to TFDS's
   normal (checksummed) download. Records are written as ``array_record`` under
   ``<cache_dir>/omniglot-<digest>/tfds``, where ``<digest>`` is the SHA-256 of the
   archives' names, sizes and SHA-256 (:func:`source_identity`): each set of archives has
   its own cache, and a run never reads a cache built from other archives.
2. **Preprocess** (once, TF-free): the prepared records are read with
   ``builder.as_data_source`` (array_record, no TensorFlow), each PNG is turned into a
   28x28 grayscale image by :func:`preprocess_image`, and the 1623 characters are cached
   as one compressed ``.npz`` (``<cache_dir>/omniglot-<digest>/omniglot_28x28_v1.npz``)
   with a manifest of its SHA-256; a file lock makes concurrent processes prepare once.
3. **Load** (every run, < 2 s): :func:`load` hashes the archives, checks the cache
   against its manifest and splits it *by character*.

Pixel convention (polarity): **ink = 1.0 on background = 0.0**. The original PNGs draw
black strokes on white, so the grayscale value is inverted: ``x = (255 - L) / 255`` where
``L`` is the 8-bit luminance after a PIL Lanczos resize to 28x28.  The image is first
converted to 8-bit grayscale (mode ``"L"``) and only then resized, because PIL silently
falls back to nearest-neighbour resampling for 1-bit images; the result is a real,
anti-aliased Lanczos downsampling.

Splits (all by character, never by image):

* ``"lake"``: the 964 background characters train, the 659 evaluation characters test
  (Lake et al., 2015); no validation set.
* ``"maml"``: as in Finn et al.'s MAML code, all 1623 characters (in global id order)
  are shuffled with ``random.Random(MAML_SPLIT_SEED).shuffle`` (``MAML_SPLIT_SEED = 1``,
  the seed of the reference code), then the first 1100 are train, the next 100
  validation and the remaining 423 test.

With ``rotations=True`` every *training* character rotated by 0, 90, 180 and 270 degrees
is a distinct class (train class ``4 * i + r`` is character ``ids.train[i]`` rotated by
``90 * r`` degrees counter-clockwise); validation and test characters are never rotated,
and no rotation of a val/test character can appear in train because the split is made
on character ids before rotating.

Environment variables: ``JAXMETA_OMNIGLOT_DIR`` (archive directory, when ``data_dir``
is not given) and ``JAXMETA_CACHE_DIR`` (cache directory, when ``cache_dir`` is not
given; default ``~/.cache/jaxmeta``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxmeta.data import provenance
from jaxmeta.errors import ConfigError, DataError, missing_extra

try:
    import tensorflow_datasets as tfds
    from etils import epath
    from PIL import Image
    from tensorflow_datasets.image_classification import omniglot as _tfds_omniglot
except ImportError as e:
    raise missing_extra(e, "omniglot", "Omniglot through TFDS") from None

__all__ = [
    "ALPHABETS",
    "ARCHIVES",
    "IMAGE_SIZE",
    "MAML_SPLIT_SEED",
    "NUM_BACKGROUND_CHARACTERS",
    "NUM_CHARACTERS",
    "NUM_DRAWERS",
    "LocalOmniglot",
    "OmniglotCharacters",
    "OmniglotConfig",
    "OmniglotSplits",
    "SplitIds",
    "cache_path",
    "extract_archive",
    "load",
    "load_characters",
    "prepare_tfds",
    "preprocess_image",
    "resolve_cache_dir",
    "resolve_data_dir",
    "source_identity",
    "rotate_classes",
    "split_character_ids",
]

DATA_DIR_ENV = "JAXMETA_OMNIGLOT_DIR"
CACHE_DIR_ENV = "JAXMETA_CACHE_DIR"

IMAGE_SIZE = 28
NUM_CHARACTERS = 1623
NUM_BACKGROUND_CHARACTERS = 964
NUM_DRAWERS = 20
MAML_SPLIT_SEED = 1
MAML_SPLIT_SIZES = (1100, 100, 423)

CACHE_FORMAT_VERSION = 1
CACHE_FILENAME = f"omniglot_{IMAGE_SIZE}x{IMAGE_SIZE}_v{CACHE_FORMAT_VERSION}.npz"

# TFDS split name -> archive file name (the names of the original release).
ARCHIVES = {
    "train": "images_background.zip",
    "test": "images_evaluation.zip",
    "small1": "images_background_small1.zip",
    "small2": "images_background_small2.zip",
}

# The 50 alphabets of Omniglot (30 background + 20 evaluation), sorted: the names of the
# stock builder's ``alphabet`` ClassLabel, fixed here so that a subset of the archives
# (e.g. only the small ones) still encodes alphabets consistently.
ALPHABETS = (
    "Alphabet_of_the_Magi", "Angelic", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian",
    "Asomtavruli_(Georgian)", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta",
    "Balinese", "Bengali", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Braille",
    "Burmese_(Myanmar)", "Cyrillic", "Early_Aramaic", "Futurama", "Ge_ez", "Glagolitic",
    "Grantha", "Greek", "Gujarati", "Gurmukhi", "Hebrew",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Japanese_(hiragana)",
    "Japanese_(katakana)", "Kannada", "Keble", "Korean", "Latin", "Malay_(Jawi_-_Arabic)",
    "Malayalam", "Manipuri", "Mkhedruli_(Georgian)", "Mongolian", "N_Ko",
    "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Old_Church_Slavonic_(Cyrillic)", "Oriya",
    "Sanskrit", "Sylheti", "Syriac_(Estrangelo)", "Syriac_(Serto)", "Tagalog", "Tengwar",
    "Tibetan", "Tifinagh", "ULOG",
)  # fmt: skip

_LAYOUT = "<root>/<Alphabet>/characterNN/XXXX_YY.png"
_CHARACTER_RE = re.compile(r"^character(\d+)$")
_IMAGE_RE = re.compile(r"^(\d{4})_(\d{2})\.png$")


def _expected_layout(splits: Sequence[str] = tuple(ARCHIVES)) -> str:
    names = ", ".join(ARCHIVES[s] for s in splits)
    return f"expected a directory holding {names}, each with {_LAYOUT}"


# --------------------------------------------------------------------------------------
# Preprocessing (shared by the data set cache and by user images).
# --------------------------------------------------------------------------------------


def _ink_uint8(img: Image.Image) -> np.ndarray:
    """Returns the ``[28, 28]`` uint8 ink map (255 = ink) of any PIL image."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    gray = img.convert("L")  # 1-bit -> {0, 255}; grayscale *before* resizing (see module).
    gray = gray.resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.Resampling.LANCZOS)
    return 255 - np.asarray(gray, dtype=np.uint8)


def _ink_to_float(ink: np.ndarray) -> np.ndarray:
    """uint8 ink map -> float32 in [0, 1] (the one conversion used everywhere)."""
    out = ink.astype(np.float32)
    out /= np.float32(255.0)
    return out


def preprocess_image(img: Image.Image) -> np.ndarray:
    """Preprocesses one image exactly as the Omniglot cache does.

    The image (any size or mode; transparency is composited on white) is converted to
    8-bit grayscale, resized to 28x28 with PIL's Lanczos filter (non-square images are
    stretched) and inverted so that dark strokes become 1.0 on a 0.0 background.

    Args:
      img: A PIL image, e.g. from ``PIL.Image.open``.

    Returns:
      A float32 array ``[28, 28, 1]`` with values in [0, 1] (ink = 1.0).
    """
    return _ink_to_float(_ink_uint8(img))[..., None]


# --------------------------------------------------------------------------------------
# Safe archive extraction.
# --------------------------------------------------------------------------------------


def _check_member(archive: Path, member: zipfile.ZipInfo, root: str) -> None:
    name = member.filename.replace("\\", "/")
    mode = member.external_attr >> 16
    # `root` is a fresh directory and symlink entries are refused, so a lexical check
    # of the normalised target is exact (and much cheaper than `realpath`).
    target = os.path.normpath(os.path.join(root, name))
    if (
        name.startswith("/")
        or re.match(r"^[A-Za-z]:", name)
        or ".." in name.split("/")
        or not (target == root or target.startswith(root + os.sep))
    ):
        raise DataError(
            f"refusing archive {archive}: entry {member.filename!r} would be extracted "
            f"outside the extraction directory (zip-slip)"
        )
    if stat.S_ISLNK(mode):
        raise DataError(f"refusing archive {archive}: entry {member.filename!r} is a symlink")


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Safely extracts a zip archive into a new directory ``dest``.

    Every entry is checked before anything is written: absolute paths, ``..`` components
    or symlinks (zip-slip) make the whole archive be refused.  Extraction goes to a
    temporary sibling directory that is renamed to ``dest`` only when complete.

    Args:
      archive: Path of the ``.zip`` file.
      dest: Directory to create (must not exist yet).

    Returns:
      ``dest`` as a :class:`~pathlib.Path`.

    Raises:
      DataError: If the archive is missing, not a valid zip, corrupt, or unsafe.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataError(f"Omniglot archive not found: {archive}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        root = os.path.realpath(tmp)
        try:
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for member in members:
                    _check_member(archive, member, root)
                zf.extractall(tmp)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            raise DataError(f"corrupt or unreadable zip archive {archive}: {e}") from e
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# --------------------------------------------------------------------------------------
# The TFDS builder.
# --------------------------------------------------------------------------------------


def _download_url(split: str) -> str:
    """The stock builder's URL of a split's archive (its split names differ: ``eval`` is our ``test``)."""
    return next(u for u in _tfds_omniglot._DL_URLS.values() if u.endswith("/" + ARCHIVES[split]))


def _check_archives(archive_dir: Path, splits: Sequence[str]) -> None:
    """Raises a one-line DataError unless ``archive_dir`` holds the archives of ``splits``."""
    if not archive_dir.is_dir():
        raise DataError(
            f"Omniglot archive directory not found: {archive_dir}; {_expected_layout(splits)}"
        )
    for split in splits:
        if not (archive_dir / ARCHIVES[split]).is_file():
            raise DataError(
                f"Omniglot archive not found: {archive_dir / ARCHIVES[split]}; "
                f"{_expected_layout(splits)}"
            )


class _Record(NamedTuple):
    alphabet: str
    alphabet_char_id: int
    label: int
    drawer: int
    path: str
    key: str


def _scan(directory: str | os.PathLike[str], source: str) -> list[_Record]:
    """Lists and validates the images of one extracted Omniglot archive."""
    directory = os.fspath(directory)
    tops = [e for e in sorted(os.listdir(directory)) if not e.startswith(("__MACOSX", "."))]
    if len(tops) != 1 or not os.path.isdir(os.path.join(directory, tops[0])):
        raise DataError(
            f"unexpected layout in {source}: top level holds {tops[:5]}; expected one "
            f"directory, laid out as {_LAYOUT}"
        )
    root = os.path.join(directory, tops[0])
    records = []
    for alphabet in sorted(os.listdir(root)):
        alphabet_dir = os.path.join(root, alphabet)
        if alphabet.startswith(".") or not os.path.isdir(alphabet_dir):
            continue
        if alphabet not in ALPHABETS:
            raise DataError(f"unknown alphabet {alphabet!r} in {source}; expected {_LAYOUT}")
        for character in sorted(os.listdir(alphabet_dir)):
            char_dir = os.path.join(alphabet_dir, character)
            match = _CHARACTER_RE.match(character)
            if character.startswith(".") or not os.path.isdir(char_dir):
                continue
            if not match:
                raise DataError(
                    f"unexpected entry {alphabet}/{character} in {source}; expected {_LAYOUT}"
                )
            alphabet_char_id = int(match.group(1)) - 1
            for image in sorted(os.listdir(char_dir)):
                if image.startswith("."):
                    continue
                m = _IMAGE_RE.match(image)
                if not m:
                    raise DataError(
                        f"unexpected file {alphabet}/{character}/{image} in {source}; "
                        f"expected {_LAYOUT}"
                    )
                label, drawer = int(m.group(1)) - 1, int(m.group(2))
                if not (0 <= label < NUM_CHARACTERS and 1 <= drawer <= NUM_DRAWERS):
                    raise DataError(
                        f"out-of-range image name {alphabet}/{character}/{image} in {source}"
                    )
                key = f"{alphabet}_{alphabet_char_id}_{image}"
                path = os.path.join(char_dir, image)
                records.append(_Record(alphabet, alphabet_char_id, label, drawer, path, key))
    if not records:
        raise DataError(f"no images found in {source}; expected {_LAYOUT}")
    return records


@dataclasses.dataclass(eq=False)
class OmniglotConfig(tfds.core.BuilderConfig):
    """Which of the four Omniglot splits (``train``, ``test``, ``small1``, ``small2``)."""

    splits: tuple[str, ...] = ()


class LocalOmniglot(_tfds_omniglot.Omniglot, skip_registration=True):
    """TFDS's ``omniglot`` builder, preparing from local archives when given a directory.

    Differences from the stock builder:

    * ``archive_dir``: when set, the archives are read from that directory and safely
      extracted (see :func:`extract_archive`) instead of downloaded, so TFDS's registered
      checksums are not needed.  When ``None``, TFDS's normal download is used.
    * Builder configs choose the splits: ``"lake"`` (train + test, what :func:`load`
      needs), ``"small"`` (small1 + small2) and ``"all"`` (the stock builder's four).
    * An extra integer feature ``drawer`` (1..20, from ``XXXX_YY.png``) so that the
      drawings of a character can be put in a canonical order.
    * The default file format is ``array_record`` (random access, TF-free reading).
    """

    name = "jaxmeta_omniglot"
    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {"3.0.0": "TFDS omniglot 3.0.0 plus a `drawer` feature."}
    BUILDER_CONFIGS = [
        OmniglotConfig(
            name="lake", splits=("train", "test"), description="background + evaluation"
        ),
        OmniglotConfig(
            name="small", splits=("small1", "small2"), description="Lake's small sets"
        ),
        OmniglotConfig(
            name="all", splits=("train", "test", "small1", "small2"), description="all four"
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "lake"

    def __init__(
        self,
        *,
        archive_dir: str | os.PathLike[str] | None = None,
        file_format: str | None = "array_record",
        **kwargs: Any,
    ) -> None:
        """Creates the builder.

        Args:
          archive_dir: Directory holding the Omniglot ``.zip`` archives, or ``None`` to
            download them through TFDS.
          file_format: TFDS record format; ``array_record`` allows TF-free reading.
          **kwargs: Passed to :class:`tfds.core.DatasetBuilder` (``data_dir``,
            ``config``, ``version``).
        """
        self._archive_dir = None if archive_dir is None else Path(archive_dir)
        self._extract_root: Path | None = None
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup goes through `importlib_resources`, absent in some envs.
        return epath.Path(__file__)

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> Any:
        # The stock builder's registered checksums, for the online download.
        path = tfds.core.utils.tfds_path() / "url_checksums" / "omniglot.txt"
        if not path.exists():
            return None
        return tfds.core.download.checksums.load_url_infos(path)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_tfds_omniglot._DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(105, 105, 3), encoding_format="png"),
                    "alphabet": tfds.features.ClassLabel(names=list(ALPHABETS)),
                    "alphabet_char_id": np.int64,
                    "label": tfds.features.ClassLabel(num_classes=NUM_CHARACTERS),
                    "drawer": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            homepage=_tfds_omniglot._BASE_URL,
            citation=_tfds_omniglot._CITATION,
        )

    def _local_dirs(self, dl_manager: Any, splits: Sequence[str]) -> dict[str, Path]:
        archive_dir = self._archive_dir
        assert archive_dir is not None
        _check_archives(archive_dir, splits)
        Path(dl_manager.download_dir).mkdir(parents=True, exist_ok=True)
        self._extract_root = Path(
            tempfile.mkdtemp(prefix="jaxmeta_extracted-", dir=dl_manager.download_dir)
        )
        return {
            split: extract_archive(archive_dir / ARCHIVES[split], self._extract_root / split)
            for split in splits
        }

    def _split_generators(self, dl_manager: Any) -> list[tfds.core.SplitGenerator]:
        splits = self.builder_config.splits
        if self._archive_dir is not None:
            dirs = self._local_dirs(dl_manager, splits)
            sources = {s: str(self._archive_dir / ARCHIVES[s]) for s in splits}
        else:
            dirs = dl_manager.download_and_extract(
                {s: _download_url(s) for s in splits}
            )
            sources = {s: _download_url(s) for s in splits}
        records = {s: _scan(dirs[s], sources[s]) for s in splits}

        names: dict[int, str] = {}
        for split in splits:
            for r in records[split]:
                name = f"{r.alphabet}_{r.alphabet_char_id}"
                if names.setdefault(r.label, name) != name:
                    raise DataError(
                        f"character id {r.label + 1} is both {names[r.label]} and {name} "
                        f"(in {sources[split]})"
                    )
        if len(names) == NUM_CHARACTERS:  # Only when complete, as in the stock builder.
            self.info.features["label"].names = [names[k] for k in sorted(names)]
        return [
            tfds.core.SplitGenerator(name=split, gen_kwargs={"records": records[split]})
            for split in splits
        ]

    def _generate_examples(self, records: Sequence[_Record]) -> Iterator[tuple[str, dict]]:
        for r in records:
            yield r.key, {
                "image": r.path,
                "alphabet": r.alphabet,
                "alphabet_char_id": r.alphabet_char_id,
                "label": r.label,
                "drawer": r.drawer,
            }

    def _download_and_prepare(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._download_and_prepare(*args, **kwargs)
        finally:
            if self._extract_root is not None:
                shutil.rmtree(self._extract_root, ignore_errors=True)
                self._extract_root = None


# --------------------------------------------------------------------------------------
# Directories.
# --------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Returns the archive directory: ``data_dir``, else ``$JAXMETA_OMNIGLOT_DIR``, else None."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    return None if data_dir is None else Path(data_dir).expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns ``cache_dir``, else ``$JAXMETA_CACHE_DIR``, else ``~/.cache/jaxmeta``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or "~/.cache/jaxmeta"
    return Path(cache_dir).expanduser()


def _download_identity(splits: Sequence[str]) -> dict:
    """The identity of TFDS's download: the archives' registered sizes and SHA-256."""
    infos = LocalOmniglot.url_infos or {}
    files = {}
    for split in splits:
        info = infos.get(_download_url(split))
        files[ARCHIVES[split]] = (
            {"size": int(info.size), "sha256": str(info.checksum)} if info else {"url": _download_url(split)}
        )
    return provenance.identity("omniglot", files, source="TFDS download", version=CACHE_FILENAME)


def _cached_identities(cache_dir: Path) -> list[dict]:
    """The source identities of the character caches in ``cache_dir``, newest first."""
    found = []
    for manifest in cache_dir.glob(f"omniglot-*/{CACHE_FILENAME}{provenance.MANIFEST_SUFFIX}"):
        try:
            found.append((manifest.stat().st_mtime, json.loads(manifest.read_text())["source"]))
        except (OSError, ValueError, KeyError):
            continue
    return [ident for _, ident in sorted(found, key=lambda item: -item[0]) if "digest" in ident]


def source_identity(
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    splits: Sequence[str] = ("train", "test"),
) -> dict:
    """The identity (names, sizes, SHA-256) of the archives a run reads.

    An explicit ``data_dir`` (or ``$JAXMETA_OMNIGLOT_DIR``) is hashed and must hold
    the archives.  Without one, the data are TFDS's registered download, or, when
    only caches built from other archives exist in ``cache_dir``, the newest of
    those (the data set this machine already has).

    Raises:
      DataError: the directory or one of its archives is missing or unreadable.
    """
    archive_dir = resolve_data_dir(data_dir)
    if archive_dir is not None:
        _check_archives(archive_dir, splits)
        files = {ARCHIVES[s]: provenance.file_entry(archive_dir / ARCHIVES[s]) for s in splits}
        return provenance.identity("omniglot", files, source=str(archive_dir.resolve()), version=CACHE_FILENAME)
    download = _download_identity(splits)
    if tuple(splits) != ("train", "test"):
        return download
    found = _cached_identities(resolve_cache_dir(cache_dir))
    if not found or any(ident["digest"] == download["digest"] for ident in found):
        return download
    return found[0]


def _keyed_dir(cache_dir: str | os.PathLike[str] | None, source: dict) -> Path:
    return resolve_cache_dir(cache_dir) / f"omniglot-{source['digest'][:16]}"


def cache_path(
    cache_dir: str | os.PathLike[str] | None = None, *, data_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The preprocessed ``.npz`` cache of the archives in ``data_dir`` (see :func:`source_identity`).

    Caches live in ``<cache_dir>/omniglot-<digest>/``, one directory per set of
    source archives, so a run never reads a cache built from other archives.
    """
    return _keyed_dir(cache_dir, source_identity(data_dir, cache_dir)) / CACHE_FILENAME


def prepare_tfds(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    config: str = "lake",
) -> LocalOmniglot:
    """Prepares Omniglot with TFDS (array_record under ``<cache_dir>/omniglot-<digest>/tfds``); idempotent.

    The records of each set of source archives (their SHA-256, see
    :func:`source_identity`) are prepared once, in a directory of their own.

    Args:
      data_dir: Directory of the Omniglot archives (else ``$JAXMETA_OMNIGLOT_DIR``; if
        neither, TFDS downloads them).
      cache_dir: Cache directory (else ``$JAXMETA_CACHE_DIR``, else ``~/.cache/jaxmeta``).
      config: ``"lake"`` (train + test), ``"small"`` (small1 + small2) or ``"all"``.

    Returns:
      The prepared builder; read it with ``builder.as_data_source(split)``.

    Raises:
      DataError: Missing directory or archive (even when another copy is prepared),
        corrupt or unsafe archive, bad layout.
      ConfigError: Unknown ``config``.
    """
    known = [c.name for c in LocalOmniglot.BUILDER_CONFIGS]
    if config not in known:
        raise ConfigError(f"unknown Omniglot TFDS config {config!r}; expected one of {known}")
    archive_dir = resolve_data_dir(data_dir)
    splits = next(c.splits for c in LocalOmniglot.BUILDER_CONFIGS if c.name == config)
    source = source_identity(data_dir, cache_dir, splits=splits)  # checks the archives exist
    builder = LocalOmniglot(
        archive_dir=archive_dir,
        data_dir=_keyed_dir(cache_dir, source) / "tfds",
        config=config,
    )
    if builder.is_prepared():
        return builder
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder


# --------------------------------------------------------------------------------------
# The preprocessed cache.
# --------------------------------------------------------------------------------------


class OmniglotCharacters(NamedTuple):
    """All 1623 characters, indexed by global character id (0-based).

    Attributes:
      images: uint8 ``[1623, 20, 28, 28]`` ink maps (255 = ink); drawings in drawer order.
      alphabet: str ``[1623]``, the alphabet of each character.
      background: bool ``[1623]``, whether it comes from ``images_background``.
    """

    images: np.ndarray
    alphabet: np.ndarray
    background: np.ndarray


def _read_prepared(builder: LocalOmniglot) -> OmniglotCharacters:
    """Reads the prepared ``train``/``test`` splits TF-free and preprocesses them."""
    images = np.zeros((NUM_CHARACTERS, NUM_DRAWERS, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    seen = np.zeros((NUM_CHARACTERS, NUM_DRAWERS), bool)
    alphabet = np.full(NUM_CHARACTERS, "", dtype=f"<U{max(map(len, ALPHABETS))}")
    background = np.zeros(NUM_CHARACTERS, bool)
    # Raw PNG bytes, decoded here: TFDS's numpy decoding of these 1-bit PNGs via PIL
    # yields 0/1 instead of 0/255, and this way the pixels go through the very same
    # `_ink_uint8` as `preprocess_image`.
    decoders = {"image": tfds.decode.SkipDecoding()}
    for split, is_background in (("train", True), ("test", False)):
        source = builder.as_data_source(split, decoders=decoders)
        for start in range(0, len(source), 1024):
            batch = source.__getitems__(range(start, min(start + 1024, len(source))))
            for ex in batch:
                label, drawer = int(ex["label"]), int(ex["drawer"]) - 1
                if seen[label, drawer]:
                    raise DataError(f"duplicate Omniglot image: character {label + 1}, "
                                    f"drawer {drawer + 1} in {builder.data_dir}")
                seen[label, drawer] = True
                with Image.open(io.BytesIO(ex["image"])) as img:
                    images[label, drawer] = _ink_uint8(img)
                alphabet[label] = ALPHABETS[int(ex["alphabet"])]
                background[label] = is_background
    if not seen.all():
        missing = int((~seen).sum())
        raise DataError(
            f"incomplete Omniglot data in {builder.data_dir}: {missing} of "
            f"{seen.size} images missing; {_expected_layout(('train', 'test'))}"
        )
    return OmniglotCharacters(images, alphabet, background)


def _write_npz(chars: OmniglotCharacters, path: Path) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(
            f,
            version=np.asarray(CACHE_FORMAT_VERSION),
            images=chars.images,
            alphabet=chars.alphabet,
            background=chars.background,
        )


def _read_cache(path: Path) -> OmniglotCharacters:
    """Reads a cache file that matched its manifest's SHA-256."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_FORMAT_VERSION:
                raise DataError(f"Omniglot cache {path} has format {int(z['version'])}, "
                                f"expected {CACHE_FORMAT_VERSION}; delete it to rebuild")
            chars = OmniglotCharacters(z["images"], z["alphabet"], z["background"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"unreadable Omniglot cache {path} ({e}); delete it to rebuild") from None
    shape = (NUM_CHARACTERS, NUM_DRAWERS, IMAGE_SIZE, IMAGE_SIZE)
    if chars.images.shape != shape or chars.images.dtype != np.uint8:
        raise DataError(f"Omniglot cache {path} holds {chars.images.shape} {chars.images.dtype}, "
                        f"expected {shape} uint8; delete it to rebuild")
    return chars


def load_characters(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> OmniglotCharacters:
    """Returns all 1623 preprocessed characters, preparing and caching them if needed.

    The archives are identified by their SHA-256 (:func:`source_identity`) and
    their characters cached in ``<cache_dir>/omniglot-<digest>/omniglot_28x28_v1.npz``.
    The first call for a set of archives prepares them through TFDS (needs
    TensorFlow; ~tens of seconds), under a file lock, so concurrent processes
    prepare once; later calls read the cache after checking its SHA-256 (a
    damaged cache is rebuilt with a warning).

    Args:
      data_dir: Directory of the Omniglot archives (else ``$JAXMETA_OMNIGLOT_DIR``; if
        neither, the cache this machine has, else TFDS's download).
      cache_dir: Cache directory (else ``$JAXMETA_CACHE_DIR``, else ``~/.cache/jaxmeta``).

    Returns:
      The characters, ordered by global character id.

    Raises:
      DataError: Missing, unreadable or corrupt archives in ``data_dir``.
    """
    source = source_identity(data_dir, cache_dir)
    keyed = _keyed_dir(cache_dir, source)
    tfds_dir = keyed / "tfds"
    fresh = not tfds_dir.exists()

    def build() -> OmniglotCharacters:
        try:
            builder = prepare_tfds(data_dir=data_dir, cache_dir=cache_dir, config="lake")
            return _read_prepared(builder)
        except BaseException:
            if fresh:  # leave no half-prepared records of these archives behind
                shutil.rmtree(tfds_dir, ignore_errors=True)
            raise

    return provenance.cached(keyed / CACHE_FILENAME, build=build, write=_write_npz, read=_read_cache,
                             what="Omniglot", source=source)


# --------------------------------------------------------------------------------------
# Splits.
# --------------------------------------------------------------------------------------


class SplitIds(NamedTuple):
    """Global character ids (0-based, int64) of each split; ``val`` may be None."""

    train: np.ndarray
    val: np.ndarray | None
    test: np.ndarray


class OmniglotSplits(NamedTuple):
    """Images of each split, float32 ``[classes, 20, 28, 28, 1]`` in [0, 1], ink = 1.0.

    With rotations, train class ``4 * i + r`` is character ``SplitIds.train[i]``
    rotated by ``90 * r`` degrees; ``val`` is None for the ``"lake"`` split.
    """

    train: np.ndarray
    val: np.ndarray | None
    test: np.ndarray


def split_character_ids(split: str = "maml") -> SplitIds:
    """Returns the character ids of a split (no data needed).

    Args:
      split: ``"maml"`` (1100 / 100 / 423, shuffled with ``MAML_SPLIT_SEED``) or
        ``"lake"`` (964 background / none / 659 evaluation).

    Returns:
      The sorted-by-split-order character ids of train, val and test.

    Raises:
      ConfigError: Unknown split name.
    """
    if split == "lake":
        ids = np.arange(NUM_CHARACTERS, dtype=np.int64)
        return SplitIds(ids[:NUM_BACKGROUND_CHARACTERS], None, ids[NUM_BACKGROUND_CHARACTERS:])
    if split == "maml":
        order = list(range(NUM_CHARACTERS))
        random.Random(MAML_SPLIT_SEED).shuffle(order)
        ids = np.asarray(order, dtype=np.int64)
        n_train, n_val, _ = MAML_SPLIT_SIZES
        return SplitIds(ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :])
    raise ConfigError(f"unknown Omniglot split {split!r}; expected 'maml' or 'lake'")


def rotate_classes(images: np.ndarray) -> np.ndarray:
    """Makes each class rotated by 0/90/180/270 degrees a class of its own.

    Args:
      images: ``[classes, examples, H, W, ...]`` with ``H == W``.

    Returns:
      ``[4 * classes, examples, H, W, ...]``; class ``4 * i + r`` is class ``i`` rotated
      by ``90 * r`` degrees counter-clockwise (``np.rot90`` over the H, W axes).
    """
    out = np.empty((images.shape[0], 4, *images.shape[1:]), images.dtype)
    for r in range(4):
        out[:, r] = np.rot90(images, k=r, axes=(2, 3))
    return out.reshape(-1, *images.shape[1:])


def load(
    split: str = "maml",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    rotations: bool = True,
) -> OmniglotSplits:
    """Loads Omniglot split by character, as float32 ``[classes, 20, 28, 28, 1]``.

    Args:
      split: ``"maml"`` (1100 train / 100 val / 423 test characters) or ``"lake"``
        (964 background train / 659 evaluation test, ``val`` None).
      data_dir: Directory of the Omniglot archives (else ``$JAXMETA_OMNIGLOT_DIR``; if
        neither, TFDS downloads them); only used when the cache must be built.
      cache_dir: Cache directory (else ``$JAXMETA_CACHE_DIR``, else ``~/.cache/jaxmeta``).
      rotations: Add the 90/180/270-degree rotations of every *training* character as
        new classes (train gets 4x the characters as classes).

    Returns:
      The ``(train, val, test)`` images, values in [0, 1], ink = 1.0.

    Raises:
      ConfigError: Unknown split.
      DataError: Missing or bad archives when the cache has to be built.
    """
    ids = split_character_ids(split)
    images = load_characters(data_dir=data_dir, cache_dir=cache_dir).images

    def take(char_ids: np.ndarray, rotate: bool) -> np.ndarray:
        x = images[char_ids]
        if rotate:
            x = rotate_classes(x)
        return _ink_to_float(x)[..., None]

    return OmniglotSplits(
        train=take(ids.train, rotations),
        val=None if ids.val is None else take(ids.val, False),
        test=take(ids.test, False),
    )
