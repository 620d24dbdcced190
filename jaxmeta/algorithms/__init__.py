"""Meta-learning algorithms, each a factory returning a :class:`MetaLearner`."""

from jaxmeta.algorithms.base import MetaLearner, MetaState
from jaxmeta.algorithms.maml import fomaml, maml, maml_loss, maml_objective
from jaxmeta.algorithms.pretrain import pretrain
from jaxmeta.algorithms.reptile import reptile

__all__ = [
    "MetaLearner",
    "MetaState",
    "fomaml",
    "maml",
    "maml_loss",
    "maml_objective",
    "pretrain",
    "reptile",
]
