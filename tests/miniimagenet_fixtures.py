"""Tiny synthetic Mini-ImageNet data sets, in either on-disk layout, for tests.

Every class has its own colour and stripe pattern (frequency and orientation), with
per-image phase jitter and noise, so a small model can learn to tell classes apart.

Usage from another test module (``tests/`` is on ``sys.path`` under pytest)::

    from miniimagenet_fixtures import make_synthetic_miniimagenet
    root = make_synthetic_miniimagenet(tmp_path / "mini", "pickle", classes=(5, 5, 5))
    splits = miniimagenet.load(data_dir=root, cache_dir=tmp_path / "cache")
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


def class_name(split_index: int, class_index: int) -> str:
    """A WordNet-id-like class name, unique across splits (e.g. ``n10000003``)."""
    return f"n{split_index + 1}{class_index:07d}"


def synthetic_images(
    classes: tuple[int, int, int] = (6, 3, 3),
    per_class: int = 20,
    seed: int = 0,
    image_size: int = 84,
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Generates the ground truth of a synthetic data set.

    Args:
      classes: Number of classes in the train, val and test splits.
      per_class: Images per class.
      seed: Random seed; the same seed gives the same images.
      image_size: Side length of the square RGB images.

    Returns:
      ``split -> (class names sorted, uint8 [classes, per_class, size, size, 3])``.
    """
    rng = np.random.default_rng(seed)
    total = sum(classes)
    coords = np.arange(image_size, dtype=np.float64) / image_size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    out: dict[str, tuple[list[str], np.ndarray]] = {}
    g = 0  # class index over all splits
    for s, (split, n_classes) in enumerate(zip(SPLITS, classes)):
        names = [class_name(s, c) for c in range(n_classes)]
        arr = np.empty((n_classes, per_class, image_size, image_size, 3), np.uint8)
        for c in range(n_classes):
            colour = rng.uniform(40.0, 215.0, size=3)
            angle = np.pi * g / total
            freq = 2.0 + (g % 5)
            proj = xx * np.cos(angle) + yy * np.sin(angle)
            for i in range(per_class):
                phase = rng.uniform(0.0, 2.0 * np.pi)
                stripes = 0.65 + 0.35 * np.sin(2.0 * np.pi * freq * proj + phase)
                noise = rng.normal(0.0, 8.0, size=(image_size, image_size, 3))
                img = colour * stripes[..., None] + noise
                arr[c, i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
            g += 1
        out[split] = (names, arr)
    return out


def make_synthetic_miniimagenet(
    root: str | Path,
    layout: Literal["csv", "pickle"],
    classes: tuple[int, int, int] = (6, 3, 3),
    per_class: int = 20,
    seed: int = 0,
    *,
    image_size: int = 84,
    pickle_protocol: int = pickle.DEFAULT_PROTOCOL,
) -> Path:
    """Writes a synthetic Mini-ImageNet copy in one of the two supported layouts.

    Both layouts of the same arguments hold the same images, so loading either gives
    identical arrays.  To exercise grouping and sorting, CSV rows interleave classes
    (keeping each class's image order), and pickled ``image_data`` is shuffled with
    ``class_dict`` keys in reverse order.  CSV images are lossless PNGs named like the
    Ravi & Larochelle files (``<wnid><8 digits>.png``).

    Args:
      root: Directory to create (parents too); may already exist.
      layout: ``"csv"`` (``{split}.csv`` + ``images/``) or ``"pickle"``
        (``mini-imagenet-cache-{split}.pkl``, which requires ``image_size=84``).
      classes: Number of classes in the train, val and test splits.
      per_class: Images per class.
      seed: Random seed.
      image_size: Side length of the stored images (CSV layout only may differ from 84).
      pickle_protocol: Pickle protocol for the pickle layout.

    Returns:
      ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = synthetic_images(classes, per_class, seed, image_size)
    rng = np.random.default_rng(seed + 1)
    if layout == "csv":
        images_dir = root / "images"
        images_dir.mkdir(exist_ok=True)
        for split in SPLITS:
            names, arr = data[split]
            order = rng.permutation(np.repeat(np.arange(len(names)), per_class))
            seen = [0] * len(names)
            with open(root / f"{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["filename", "label"])
                for c in order:
                    i = seen[c]
                    seen[c] += 1
                    filename = f"{names[c]}{i:08d}.png"
                    Image.fromarray(arr[c, i]).save(images_dir / filename, compress_level=1)
                    writer.writerow([filename, names[c]])
    elif layout == "pickle":
        if image_size != 84:
            raise ValueError("the pickle layout holds 84x84 images only")
        for split in SPLITS:
            names, arr = data[split]
            flat = arr.reshape(-1, *arr.shape[2:])
            perm = rng.permutation(len(flat))  # image_data[j] = flat[perm[j]]
            position = np.argsort(perm)  # flat[k] is at image_data[position[k]]
            class_dict = {
                names[c]: [int(position[c * per_class + i]) for i in range(per_class)]
                for c in reversed(range(len(names)))
            }
            payload = {"image_data": flat[perm], "class_dict": class_dict}
            with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
                pickle.dump(payload, f, protocol=pickle_protocol)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return root
