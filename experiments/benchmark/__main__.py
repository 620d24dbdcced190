"""``python -m experiments.benchmark``: see :mod:`experiments.benchmark`."""

from experiments.benchmark import main
from jaxmeta.cli import run

run(main)
