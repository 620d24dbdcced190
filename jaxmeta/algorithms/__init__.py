"""Meta-learning algorithms, each a factory returning a :class:`MetaLearner`."""

from jaxmeta.algorithms.anil import anil
from jaxmeta.algorithms.anil import flax_anil_fns
from jaxmeta.algorithms.anil import head_only_lr
from jaxmeta.algorithms.base import Adapt
from jaxmeta.algorithms.base import Adaptation
from jaxmeta.algorithms.base import MetaLearner
from jaxmeta.algorithms.base import MetaState
from jaxmeta.algorithms.base import amortized
from jaxmeta.algorithms.blackbox import blackbox
from jaxmeta.algorithms.blackbox import in_context_model
from jaxmeta.algorithms.base import gradient_adapt
from jaxmeta.algorithms.imaml import conjugate_gradient
from jaxmeta.algorithms.imaml import imaml
from jaxmeta.algorithms.imaml import imaml_gradient
from jaxmeta.algorithms.maml import fomaml
from jaxmeta.algorithms.maml import maml
from jaxmeta.algorithms.maml import maml_loss
from jaxmeta.algorithms.maml import maml_objective
from jaxmeta.algorithms.mamlpp import mamlpp
from jaxmeta.algorithms.mamlpp import mamlpp_adapt
from jaxmeta.algorithms.mamlpp import mamlpp_params
from jaxmeta.algorithms.meta_sgd import meta_sgd
from jaxmeta.algorithms.meta_sgd import meta_sgd_params
from jaxmeta.algorithms.pretrain import pretrain
from jaxmeta.algorithms.protonet import prototype_head
from jaxmeta.algorithms.protonet import protonet
from jaxmeta.algorithms.reptile import reptile

__all__ = [
    "Adapt",
    "Adaptation",
    "MetaLearner",
    "MetaState",
    "amortized",
    "anil",
    "blackbox",
    "conjugate_gradient",
    "flax_anil_fns",
    "fomaml",
    "gradient_adapt",
    "head_only_lr",
    "imaml",
    "imaml_gradient",
    "in_context_model",
    "maml",
    "maml_loss",
    "maml_objective",
    "mamlpp",
    "mamlpp_adapt",
    "mamlpp_params",
    "meta_sgd",
    "meta_sgd_params",
    "pretrain",
    "protonet",
    "prototype_head",
    "reptile",
]
