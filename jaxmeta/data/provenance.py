"""Where data came from, and caches that are what they claim to be.

* :func:`identity` names a data set by its source files: each file's size and
  SHA-256, and one ``digest`` over all of them (the directory they sit in is
  recorded as ``source`` but is not part of the digest, so two copies of the
  same archives share one cache).  Runs record it in their ``config.json``;
  :func:`describe_differences` says in one phrase how two identities differ.
* :func:`cached` builds a preprocessed cache file at most once, whatever the
  number of processes asking for it at the same time (a file lock), never shows
  a half-written file (temporary file + rename), and checks the file against the
  SHA-256 in its manifest on every read: a truncated or altered cache is rebuilt,
  with a warning, instead of being trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import filelock

from jaxmeta.errors import DataError, JaxmetaWarning
from jaxmeta.io import sha256_file, write_json

__all__ = ["cached", "describe_differences", "file_entry", "identity", "sha256_file", "tree_entry"]

log = logging.getLogger(__name__)

T = TypeVar("T")
MANIFEST_SUFFIX = ".manifest.json"


_seen: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> SHA-256, for this process


def file_entry(path: str | os.PathLike[str]) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file; a missing or unreadable one is a :class:`DataError`.

    Within one process a file is hashed once while its inode, size and
    modification time stay the same (a data set is hashed at load and again when
    a run records it).
    """
    try:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _seen:
            _seen[key] = sha256_file(path)
        return {"size": st.st_size, "sha256": _seen[key]}
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def tree_entry(root: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]]) -> dict:
    """One entry for many files (e.g. 60,000 images): their number, total size, and a
    SHA-256 over every file's path relative to ``root``, size and SHA-256."""
    h = hashlib.sha256()
    total = count = 0
    for path in sorted(Path(p) for p in paths):
        entry = file_entry(path)
        rel = path.relative_to(root).as_posix()
        h.update(f"{rel}\0{entry['size']}\0{entry['sha256']}\n".encode())
        total += entry["size"]
        count += 1
    return {"files": count, "size": total, "sha256": h.hexdigest()}


def identity(dataset: str, files: Mapping[str, dict], *, source: str, version: str | None = None) -> dict:
    """A data set's identity: its source files (name -> :func:`file_entry`) and their digest.

    Args:
      dataset: the data set's name (``"omniglot"``).
      files: each source file's name and entry (:func:`file_entry` or :func:`tree_entry`).
      source: where the files are (a directory, or a download's name); recorded, not digested.
      version: the preprocessing's version, when the identity keys a cache.

    Returns:
      ``{"dataset", "source", "files", "digest"}`` (JSON-ready).
    """
    files = {name: dict(files[name]) for name in sorted(files)}
    keyed = {"dataset": dataset, "files": files, **({"version": version} if version else {})}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()
    return {"dataset": dataset, "source": str(source), "files": files, "digest": digest}


def describe_differences(recorded: Mapping | None, current: Mapping) -> str | None:
    """How ``current`` differs from ``recorded`` in one phrase, or ``None`` when they agree."""
    if not recorded or "files" not in recorded:
        return None
    if recorded.get("dataset") != current.get("dataset"):
        return f"data set {recorded.get('dataset')!r} vs {current.get('dataset')!r}"
    old, new = recorded["files"], current["files"]
    changed = sorted(n for n in old if n in new and old[n] != new[n])
    missing = sorted(n for n in old if n not in new)
    extra = sorted(n for n in new if n not in old)
    if not (changed or missing or extra):
        return None
    parts = []
    for label, names in (("changed", changed), ("missing now", missing), ("new", extra)):
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            parts.append(f"{label}: {shown}")
    return f"{'; '.join(parts)} (recorded from {recorded.get('source')}, now {current.get('source')})"


def _check(path: Path) -> str | None:
    """Why the cache file ``path`` cannot be trusted (``None``: it matches its manifest)."""
    manifest = path.with_name(path.name + MANIFEST_SUFFIX)
    if not path.exists() and not manifest.exists():
        return "missing"
    try:
        recorded = json.loads(manifest.read_text())["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest is missing or unreadable"
    try:  # hashed afresh, never from the per-process memo: the check must see what is on disk now
        actual = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    except OSError:
        return "the file is missing or unreadable"
    if actual["size"] != recorded.get("size"):
        return f"size {actual['size']} bytes, manifest says {recorded.get('size')}"
    if actual["sha256"] != recorded.get("sha256"):
        return "its SHA-256 differs from its manifest's"
    return None


def cached(
    path: str | os.PathLike[str],
    *,
    build: Callable[[], T],
    write: Callable[[T, Path], None],
    read: Callable[[Path], T],
    what: str,
    source: Mapping | None = None,
) -> T:
    """Reads the cache file ``path``, building it first when it is missing or damaged.

    A file is read only when its size and SHA-256 match ``path + ".manifest.json"``
    (written after the file, so a half-written cache never matches).  Building
    happens under a file lock (``path + ".lock"``), so concurrent processes build
    once and the others wait and read the result.  A damaged file is rebuilt with a
    :class:`~jaxmeta.errors.JaxmetaWarning`; when the cache cannot be written (a
    read-only directory) the built value is returned with a warning.

    Args:
      path: the cache file.
      build: ``build() -> value``, the (slow) preprocessing.
      write: ``write(value, tmp_path)`` writes the value's file at ``tmp_path``.
      read: ``read(path) -> value`` reads a verified file.
      what: the data set's name, for messages.
      source: the identity of the source files, stored in the manifest.
    """
    path = Path(path)
    if _check(path) is None:
        return read(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError:
        lock = None  # an unwritable cache directory: build without sharing the result
    try:
        reason = _check(path)
        if reason is None:
            return read(path)  # another process built it while this one waited
        if reason != "missing":
            warnings.warn(f"{what} cache {path} is damaged ({reason}); rebuilding it", JaxmetaWarning,
                          stacklevel=2)
        log.info("preparing %s cache %s", what, path)
        value = build()
        try:
            _publish(path, value, write, source)
        except OSError as e:
            warnings.warn(f"could not write {what} cache {path}: {e.strerror or e}", JaxmetaWarning,
                          stacklevel=2)
        return value
    finally:
        if lock is not None:
            lock.release()


def _publish(path: Path, value, write: Callable, source: Mapping | None) -> None:
    """Writes ``value`` to ``path`` (temporary file + rename), then its manifest."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(value, Path(tmp))
        os.chmod(tmp, 0o644)
        entry = {"size": os.path.getsize(tmp), "sha256": sha256_file(tmp)}
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    write_json(str(path) + MANIFEST_SUFFIX, {"file": entry, "source": dict(source or {})})


def code_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The git commit of the checkout holding ``path`` (default: this package), ``+dirty`` when it has
    uncommitted changes to tracked files; ``None`` outside a git checkout (e.g. an installed wheel)."""
    where = os.fspath(path) if path is not None else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")
