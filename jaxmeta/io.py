"""Atomic file writes: a run directory is never left half-written."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from typing import Any, Callable

import numpy as np

from jaxmeta.errors import JaxmetaWarning, MissingExtraError, missing_extra


def _default(obj: Any):
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (the ``plots`` extra), or a one-line error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise missing_extra(e, "plots", "no figures drawn") from None
    return plt


_NOT_DRAWN: list[str] = []


def figure(draw: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a function that draws and saves a figure: without matplotlib (the ``plots`` extra) it
    warns (one ``warning:`` line) and draws nothing, so a run's numbers never wait on its figures."""

    @functools.wraps(draw)
    def drawn_if_possible(*args, **kwargs):
        try:
            return draw(*args, **kwargs)
        except MissingExtraError as e:
            if not _NOT_DRAWN:  # one line per process, however many figures
                _NOT_DRAWN.append(str(e))
                warnings.warn(str(e), JaxmetaWarning, stacklevel=2)
            return None

    return drawn_if_possible


def save_figure(fig, path: str, *, dpi: int = 110) -> None:
    """Writes a matplotlib figure as PNG atomically, then closes it."""
    import io

    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def to_json(obj: Any, **kwargs) -> str:
    """``json.dumps`` that also accepts numpy and JAX scalars and arrays."""
    return json.dumps(obj, default=_default, **kwargs)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, to_json(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Writes ``rows`` as JSON lines to ``path`` atomically."""
    atomic_write_text(path, "".join(to_json(r) + "\n" for r in rows))


def read_jsonl(path: str) -> list[dict]:
    """Reads JSON lines (an absent file reads as no rows)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
