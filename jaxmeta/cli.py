"""Command-line plumbing shared by the experiments: one clear line on bad input."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Sequence

from jaxmeta.errors import ConfigError, JaxmetaError, JaxmetaWarning


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors raise :class:`ConfigError` (one line, exit 2)."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        raise ConfigError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _finite_float(text: str, *, allow_zero: bool) -> float:
    what = "a non-negative number" if allow_zero else "a positive number"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    return _finite_float(text, allow_zero=False)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    return _finite_float(text, allow_zero=True)


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: a comma-separated list of positive integers."""
    return tuple(positive_int(part) for part in text.split(",") if part.strip())


def choice_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """argparse type: a comma-separated subset of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown name(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(choices)}"
            )
        return names

    return parse


def writable_dir(path: str) -> str:
    """Creates ``path`` if needed and checks that files can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {path} is not writable")
    return path


def quiet_libraries() -> None:
    """Keeps TensorFlow/TFDS/absl chatter (warnings meant for developers) off the terminal."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Orbax and TFDS log through absl; their problems reach the user as our own one-line errors.
    logging.getLogger("absl").setLevel(logging.CRITICAL)


def _one_line_warnings() -> None:
    """Shows every :class:`JaxmetaWarning` as one ``warning: ...`` line on stderr."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, JaxmetaWarning):
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", JaxmetaWarning)


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Runs ``main(argv)``; user-facing errors become one line on stderr and exit code 2.

    Training stopped by a signal (:class:`~jaxmeta.training.Interrupted`)
    prints one line naming the checkpoint and the command that resumes it
    (this program as it was started, its arguments, ``--resume``) and exits
    with ``128 + signum`` (143 for SIGTERM, 130 for SIGINT). A signal in the
    final dispatch leaves nothing to resume: the line names instead the command
    that does what is left (``Interrupted.then``), where the caller set one.
    """
    quiet_libraries()
    _one_line_warnings()
    from jaxmeta.training import Interrupted  # here, not at the top: argparse helpers stay free of JAX

    try:
        main(argv)
    except Interrupted as e:
        import shlex

        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        program = ["-m", spec.name] if spec is not None and spec.name else [sys.argv[0]]
        args = list(sys.argv[1:] if argv is None else argv)
        args += [] if "--resume" in args else ["--resume"]
        if e.complete:  # nothing to resume; the caller may name what is left to do
            then = f"; then run: {shlex.join([sys.executable, *program, *e.then])}" if e.then else ""
        else:
            then = f"; resume with: {shlex.join([sys.executable, *program, *args])}" if e.checkpoint else ""
        print(f"{e}{then}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except JaxmetaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
