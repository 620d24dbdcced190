"""jaxmeta: gradient-based meta-learning in JAX.

Learners of pure functions over one inner loop (:func:`inner_adapt`): MAML
with the exact second-order meta-gradient, first-order MAML, Reptile, the
pre-training baseline, Meta-SGD, ANIL, MAML++, iMAML, Prototypical
Networks and an in-context (black-box) learner, each a :class:`MetaLearner` ``(init, step, adapt)`` in the optax
style; :func:`evaluate` scores any of them through its own ``adapt``.
"""

from jaxmeta.algorithms import MetaLearner
from jaxmeta.algorithms import MetaState
from jaxmeta.algorithms import anil
from jaxmeta.algorithms import blackbox
from jaxmeta.algorithms import flax_anil_fns
from jaxmeta.algorithms import fomaml
from jaxmeta.algorithms import head_only_lr
from jaxmeta.algorithms import imaml
from jaxmeta.algorithms import maml
from jaxmeta.algorithms import maml_loss
from jaxmeta.algorithms import maml_objective
from jaxmeta.algorithms import mamlpp
from jaxmeta.algorithms import mamlpp_params
from jaxmeta.algorithms import meta_sgd
from jaxmeta.algorithms import meta_sgd_params
from jaxmeta.algorithms import protonet
from jaxmeta.algorithms import pretrain
from jaxmeta.algorithms import reptile
from jaxmeta.evaluation import EvalResult
from jaxmeta.evaluation import evaluate
from jaxmeta.inner import adapt_and_observe
from jaxmeta.inner import inner_adapt
from jaxmeta.types import Task

__version__ = "0.1.0"

__all__ = [
    "EvalResult",
    "MetaLearner",
    "MetaState",
    "Task",
    "adapt_and_observe",
    "anil",
    "blackbox",
    "evaluate",
    "flax_anil_fns",
    "fomaml",
    "head_only_lr",
    "imaml",
    "inner_adapt",
    "maml",
    "maml_loss",
    "maml_objective",
    "mamlpp",
    "mamlpp_params",
    "meta_sgd",
    "meta_sgd_params",
    "pretrain",
    "protonet",
    "reptile",
]
