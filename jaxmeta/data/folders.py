"""Episodes from image folders: ``SDIR/<class>/*.png`` support, ``QDIR/<class>/*.png`` query.

Classes are the sub-directory names, sorted; class ``i`` of the sorted list gets label
``i``.  The query folders' names are only used to score predictions: they must name
the same classes as the support folders.  Images are read with PIL and passed to a
``preprocess`` callable (e.g. :func:`jaxmeta.data.omniglot.preprocess_image`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxmeta.errors import DataError, missing_extra
from jaxmeta.types import Task

try:
    from PIL import Image, UnidentifiedImageError
except ImportError as e:
    raise missing_extra(e, "miniimagenet", "Reading images") from None

__all__ = ["IMAGE_SUFFIXES", "load_folder_episode"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _class_dirs(root: Path, role: str) -> dict[str, Path]:
    if not root.is_dir():
        raise DataError(
            f"{role} directory not found: {root} (expected {root}/<class>/*.png|.jpg|.jpeg)"
        )
    dirs = {
        p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
    }
    if not dirs:
        raise DataError(
            f"no class folders in {role} directory {root} "
            f"(expected {root}/<class>/*.png|.jpg|.jpeg)"
        )
    return dirs


def _images_in(class_dir: Path, role: str) -> list[Path]:
    paths = sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise DataError(f"no images (.png, .jpg, .jpeg) in {role} class folder {class_dir}")
    return paths


def _read(
    path: Path, preprocess: Callable[[Image.Image], np.ndarray]
) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            x = preprocess(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise DataError(f"unreadable image {path}: {e}") from e
    return np.asarray(x, dtype=np.float32)


def _stack(arrays: list[np.ndarray], paths: list[Path]) -> np.ndarray:
    shape = arrays[0].shape
    for x, p in zip(arrays, paths):
        if x.shape != shape:
            raise DataError(
                f"preprocessed image {p} has shape {x.shape}, expected {shape} like {paths[0]}"
            )
    return np.stack(arrays)


def load_folder_episode(
    support_dir: str | os.PathLike[str],
    query_dir: str | os.PathLike[str],
    preprocess: Callable[[Image.Image], np.ndarray],
) -> tuple[Task, list[str], list[str]]:
    """Loads one (unbatched) episode from a support and a query folder.

    Args:
      support_dir: ``SDIR`` holding ``SDIR/<class>/*.png`` (or ``.jpg``/``.jpeg``).
      query_dir: ``QDIR`` holding ``QDIR/<class>/*.png``, with the same class names.
      preprocess: Maps a PIL image to a float array (same shape for every image).

    Returns:
      ``(task, class_names, query_paths)``: ``task`` holds numpy arrays, support
      ``(x [n_support, ...] float32, y [n_support] int32)`` and query likewise, with
      label ``i`` meaning ``class_names[i]`` (sorted folder names); ``query_paths`` are
      the query files relative to ``query_dir`` (POSIX separators), in the order of
      the query rows.

    Raises:
      DataError: One line, for a missing directory, a folder without images, class
        folders that differ between support and query, or an unreadable image.
    """
    support_root, query_root = Path(support_dir), Path(query_dir)
    support_classes = _class_dirs(support_root, "support")
    query_classes = _class_dirs(query_root, "query")
    if set(support_classes) != set(query_classes):
        only_s = sorted(set(support_classes) - set(query_classes))
        only_q = sorted(set(query_classes) - set(support_classes))
        raise DataError(
            f"support and query classes differ: only in support {only_s}, "
            f"only in query {only_q} ({support_root} vs {query_root})"
        )
    class_names = sorted(support_classes)

    def read_split(
        classes: dict[str, Path], role: str
    ) -> tuple[np.ndarray, np.ndarray, list[Path]]:
        paths: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(class_names):
            found = _images_in(classes[name], role)
            paths += found
            labels += [label] * len(found)
        xs = [_read(p, preprocess) for p in paths]
        return _stack(xs, paths), np.asarray(labels, dtype=np.int32), paths

    support_x, support_y, _ = read_split(support_classes, "support")
    query_x, query_y, query_files = read_split(query_classes, "query")
    if support_x.shape[1:] != query_x.shape[1:]:
        raise DataError(
            f"support images preprocess to {support_x.shape[1:]} but query images to "
            f"{query_x.shape[1:]}"
        )
    query_paths = [p.relative_to(query_root).as_posix() for p in query_files]
    task = Task(support=(support_x, support_y), query=(query_x, query_y))
    return task, class_names, query_paths
