"""``python -m experiments.sinusoid``: see :mod:`experiments.sinusoid`."""

from experiments.sinusoid import main
from jaxmeta.cli import run

run(main)
