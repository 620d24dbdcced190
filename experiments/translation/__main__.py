"""``python -m experiments.translation``: see :mod:`experiments.translation`."""

from experiments.translation import main
from jaxmeta.cli import run

run(main)
