"""Data-parallel meta-training over 4 (forced host) devices equals one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jaxmeta.algorithms.registry import make_learner
    from jaxmeta.data import sinusoid
    from jaxmeta.distributed import check_meta_batch, task_mesh
    from jaxmeta.errors import ConfigError
    from jaxmeta.models import MLP, regression_loss
    from jaxmeta.training import init_train_state, make_train_chunk, train

    assert len(jax.devices()) == 4, jax.devices()
    model = MLP(features=(32, 32))
    loss_fn = regression_loss(model)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))["params"]

    def sample(key, _):
        return sinusoid.sample_tasks(key, batch_size=8, shots=5, queries=5)

    mesh = task_mesh()
    assert mesh.size == 4
    for algo in ("maml", "fomaml", "reptile"):
        learner = make_learner(algo, loss_fn, inner_steps=2, inner_lr=0.01, outer_lr=1e-2, meta_steps=10)
        state = init_train_state(learner, params, jax.random.PRNGKey(1))
        single, m1 = make_train_chunk(learner, sample)(state, None, 3)
        sharded, m2 = make_train_chunk(learner, sample, mesh)(state, None, 3)
        flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
        np.testing.assert_allclose(flat(sharded.meta.params), flat(single.meta.params), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(m2["loss"]), np.asarray(m1["loss"]), rtol=1e-5)
        assert not np.allclose(flat(single.meta.params), flat(params))
        # The compiled step really splits the tasks over the 4 devices.
        hlo = jax.jit(lambda s: make_train_chunk(learner, sample, mesh)(s, None, 1)).lower(state).as_text()
        assert "all-reduce" in hlo or "sharding" in hlo
        print(algo, "ok")

    result = train(make_learner("maml", loss_fn, inner_steps=1, inner_lr=0.01, outer_lr=1e-2), params, sample,
                   key=jax.random.PRNGKey(2), meta_steps=6, log_every=3, mesh=mesh, progress=False)
    assert int(result.state.step) == 6
    try:
        check_meta_batch(6, mesh)
    except ConfigError as e:
        assert "does not divide evenly over 4 devices" in str(e)
        print("indivisible ok")
    """
)


def test_sharded_meta_step_equals_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["maml", "ok", "fomaml", "ok", "reptile", "ok", "indivisible", "ok"]
