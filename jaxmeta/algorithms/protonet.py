"""Prototypical Networks (Snell, Swersky & Zemel, 2017): a metric learner on the learner interface.

A body embeds the examples; each class's *prototype* ``c_k`` is the mean of
its support embeddings, and a query embedding ``f`` gets the logits
``-||f - c_k||²``.  Training minimises the query cross-entropy, so the body
learns an embedding in which classes cluster around their means.  There is
no inner gradient loop: adaptation is computing the prototypes.

The squared-Euclidean classifier is a linear one (the paper's §2.4):
``-||f - c_k||² = 2 c_k·f - ||c_k||² - ||f||²``, and the last term is the
same for every class, so it cancels in the softmax.  :func:`prototype_head`
writes the prototypes as the weights of the model's own linear head
(``kernel = 2 Cᵀ``, ``bias = -||c_k||²``).  The adapted parameters are
therefore ordinary model parameters: the same loss function, evaluation
modes (transductive or not), checkpoints and ensembles serve Prototypical
Networks and MAML alike.

Differences from the paper's Omniglot set-up: the body is this library's
:class:`~jaxmeta.models.Conv4` (stride-2 convolutions and a global mean pool
instead of max-pools; 64 features either way), and training episodes have
the test's ways unless the pipeline is told otherwise (the paper trains
1-shot Omniglot with 60 classes per episode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmeta.algorithms.anil import FeaturesFn, head_split
from jaxmeta.algorithms.base import MetaLearner, MetaState, apply_outer, init_state, mean_metrics, meta_params
from jaxmeta.inner import LossFn, loss_value
from jaxmeta.tasks import map_tasks
from jaxmeta.types import Batch, Params, Task


def prototypes(features: jax.Array, labels: jax.Array, ways: int) -> jax.Array:
    """Each class's mean embedding: ``[ways, dim]`` from ``features [N, dim]`` and integer ``labels [N]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
      >>> prototypes(f, jnp.array([0, 0, 1]), 2).tolist()
      [[1.0, 0.0], [0.0, 4.0]]
    """
    one_hot = jax.nn.one_hot(labels, ways, dtype=features.dtype)
    counts = jnp.maximum(one_hot.sum(axis=0), 1.0)
    return (one_hot.T @ features) / counts[:, None]


def prototype_head(features: jax.Array, labels: jax.Array, ways: int) -> dict[str, jax.Array]:
    """The linear head whose logits are ``-||f - c_k||²`` up to a per-example constant.

    Returns ``{"kernel": 2 Cᵀ [dim, ways], "bias": -||c_k||² [ways]}`` for the
    :func:`prototypes` ``C`` of the support set: the layout of a Flax
    ``nn.Dense`` head, so the softmax of ``features @ kernel + bias`` is the
    Prototypical Networks classifier.
    """
    c = prototypes(features, labels, ways)
    return {"kernel": 2.0 * c.T, "bias": -jnp.sum(c * c, axis=-1)}


def protonet(
    features_fn: FeaturesFn,
    head_loss_fn: LossFn,
    *,
    head: str = "head",
    outer: optax.GradientTransformation,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> MetaLearner:
    """Prototypical Networks as a :class:`~jaxmeta.MetaLearner` over a model with a linear head.

    Args:
      features_fn: ``features_fn(body_params, x) -> [N, dim]`` embeddings, e.g.
        from :func:`~jaxmeta.algorithms.anil.flax_anil_fns`.
      head_loss_fn: ``head_loss_fn(head_params, (features, y))`` for the
        model's ``nn.Dense`` head (``{head: {"kernel", "bias"}}``), with
        integer labels ``y``.
      head: the top-level key of the head's parameters (``"head"`` for
        :class:`~jaxmeta.models.Conv4`); its bias gives the number of ways.
      outer: the optax optimiser of the body (the paper: Adam 1e-3).
      has_aux: whether ``head_loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      A :class:`~jaxmeta.MetaLearner` whose state holds the full model
      parameters (the head's own weights are never trained: ``adapt``
      replaces them with the prototypes).  ``adapt(state, support, steps=S)``
      returns the parameters with the prototype head; it takes no gradient
      steps, so with ``observe`` every one of the ``S + 1`` entries is the
      same.  ``step`` metrics: ``loss``, ``query_loss_post`` (and aux values)
      and ``grad_norm``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxmeta import Task
      >>> from jaxmeta.algorithms.anil import DenseHead
      >>> from jaxmeta.models import classification_loss
      >>> features = lambda body, x: x @ body["embed"]
      >>> learner = protonet(features, classification_loss(DenseHead("head")), outer=optax.adam(1e-2),
      ...                    has_aux=True)
      >>> params = {"embed": jnp.eye(2), "head": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
      >>> support = (jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([0, 1]))
      >>> adapted = learner.adapt(learner.init(params), support, steps=0)
      >>> (jnp.array([[0.9, 0.2]]) @ adapted["head"]["kernel"] + adapted["head"]["bias"]).argmax(-1).tolist()
      [0]
    """
    split, merge = head_split(head)

    def ways_of(params: Params) -> int:
        return split(params)[1][head]["bias"].shape[-1]

    def adapted_params(params: Params, support: Batch) -> Params:
        body, _ = split(params)
        x, y = support
        return merge(body, {head: prototype_head(features_fn(body, x), y, ways_of(params))})

    def task_loss(params: Params, task: Task):
        body, _ = split(params)
        x, y = task.support
        head_params = {head: prototype_head(features_fn(body, x), y, ways_of(params))}
        xq, yq = task.query
        loss, aux = loss_value(head_loss_fn, head_params, (features_fn(body, xq), yq), has_aux=has_aux)
        return loss, {f"query_{k}_post": v for k, v in {"loss": loss, **aux}.items()}

    def objective(params: Params, tasks: Task):
        losses, metrics = map_tasks(lambda task: task_loss(params, task), tasks, chunk_size)
        return losses.mean(), mean_metrics(metrics)

    def init(params: Params) -> MetaState:
        ways_of(params)  # fail early on a wrong head name
        return init_state(outer, params)

    def step(state: MetaState, tasks: Task):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, tasks)
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
        return apply_outer(outer, state, grads), metrics

    def adapt(state, support, *, steps, key=None, observe=None):
        del key
        adapted = adapted_params(meta_params(state), support)
        if observe is None:
            return adapted
        seen = observe(adapted)
        return adapted, jax.tree.map(lambda v: jnp.broadcast_to(v, (steps + 1, *jnp.shape(v))), seen)

    return MetaLearner(init, step, adapt)
