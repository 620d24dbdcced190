"""PyTorch reference of one second-order MAML meta-step, for ``benchmark --torch``.

Imported only when PyTorch is installed.  The network is the Conv4 of
:func:`jaxmeta.models.conv4_omniglot`: four blocks of [3x3 conv with 64 filters,
stride 2 and XLA's ``SAME`` padding, no bias; batch norm with the batch's
statistics and a learnable scale and bias; ReLU], a spatial mean and a linear
head.  The meta-step is Omniglot 5-way 1-shot, 32 tasks, 15 queries per class,
one inner SGD step at lr 0.4 with the exact second-order meta-gradient, then
Adam(1e-3) outside.  Two idiomatic styles are timed:

* ``torch_func``: ``torch.func.functional_call`` + ``grad`` (grad of grad) +
  ``vmap`` over tasks;
* ``torch_func_plain_bn``: the same with batch norm written in plain tensor
  ops (see :class:`PlainBatchNorm2d`: ``vmap`` of grad-of-grad through
  ``F.batch_norm`` is wrong in PyTorch 2.13, ~0.4% off in gradient norm and
  ~1-8% along random directions);
* ``autograd_loop``: a learn2learn-style Python loop over tasks with
  ``torch.autograd.grad(create_graph=True)`` and ``backward`` per task.

Before any timing is trusted, each style's meta-gradient is compared with
JAX's on identical weights and data, and the loop's with a central finite
difference in float64.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WAYS, SHOTS, QUERIES, BATCH = 5, 1, 15, 32
INNER_LR, OUTER_LR = 0.4, 1e-3
FILTERS, EPS = 64, 1e-5

NAMES = tuple(
    [f"conv_{k}.weight" for k in range(4)]
    + [f"bn_{k}.{p}" for k in range(4) for p in ("weight", "bias")]
    + ["head.weight", "head.bias"]
)


def same_padding(size: int, kernel: int = 3, stride: int = 2) -> tuple[int, int]:
    """XLA's ``SAME`` padding ``(low, high)`` (as :func:`jaxmeta.models.same_padding`)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class PlainBatchNorm2d(nn.Module):
    """Batch norm on batch statistics written with plain tensor ops (same parameters as ``BatchNorm2d``).

    ``torch.func.vmap`` of a grad-of-grad through ``F.batch_norm`` gives a wrong
    second-order MAML gradient (its batching rule in the double backward); with
    these plain ops the result is exact.
    """

    def __init__(self, features: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = (x - mean).square().mean(dim=(0, 2, 3), keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class Conv4(nn.Module):
    """Conv4 for Omniglot in PyTorch (NCHW), batch norm always on batch statistics.

    ``plain_bn`` swaps ``nn.BatchNorm2d`` for :class:`PlainBatchNorm2d`.
    """

    def __init__(self, ways: int = WAYS, filters: int = FILTERS, act: Callable = F.relu, plain_bn: bool = False):
        super().__init__()
        self.act = act
        chans = [1, filters, filters, filters, filters]
        for k in range(4):
            setattr(self, f"conv_{k}", nn.Conv2d(chans[k], chans[k + 1], 3, stride=2, padding=0, bias=False))
            bn = PlainBatchNorm2d(filters) if plain_bn else nn.BatchNorm2d(
                filters, eps=EPS, affine=True, track_running_stats=False)
            setattr(self, f"bn_{k}", bn)
        self.head = nn.Linear(filters, ways)

    def forward(self, x):
        for k in range(4):
            h, w = x.shape[-2:]
            (t, b), (l, r) = same_padding(h), same_padding(w)
            x = F.pad(x, (l, r, t, b))
            x = self.act(getattr(self, f"bn_{k}")(getattr(self, f"conv_{k}")(x)))
        return self.head(x.mean(dim=(2, 3)))


def functional_forward(params: dict, x, act: Callable = F.relu):
    """The same network as :class:`Conv4`, written with ``torch.nn.functional`` on a dict of tensors."""
    for k in range(4):
        h, w = x.shape[-2:]
        (t, b), (l, r) = same_padding(h), same_padding(w)
        x = F.conv2d(F.pad(x, (l, r, t, b)), params[f"conv_{k}.weight"], stride=2)
        x = F.batch_norm(x, None, None, params[f"bn_{k}.weight"], params[f"bn_{k}.bias"], training=True, eps=EPS)
        x = act(x)
    return F.linear(x.mean(dim=(2, 3)), params["head.weight"], params["head.bias"])


def params_from_jax(jax_params, dtype=torch.float32) -> dict:
    """Torch tensors (OIHW kernels, ``[out, in]`` head) from a Conv4 Flax ``params`` tree."""
    p = {}
    for k in range(4):
        p[f"conv_{k}.weight"] = torch.tensor(np.asarray(jax_params[f"conv_{k}"]["kernel"])).permute(3, 2, 0, 1)
        p[f"bn_{k}.weight"] = torch.tensor(np.asarray(jax_params[f"bn_{k}"]["scale"]))
        p[f"bn_{k}.bias"] = torch.tensor(np.asarray(jax_params[f"bn_{k}"]["bias"]))
    p["head.weight"] = torch.tensor(np.asarray(jax_params["head"]["kernel"])).T
    p["head.bias"] = torch.tensor(np.asarray(jax_params["head"]["bias"]))
    return {k: v.contiguous().to(dtype) for k, v in p.items()}


def grads_to_torch_layout(jax_grads) -> dict:
    """A JAX gradient tree in the torch parameter layout (as float64 numpy)."""
    return {k: v.double().numpy() for k, v in params_from_jax(jax_grads, torch.float64).items()}


def tasks_to_torch(tasks, dtype=torch.float32):
    """``(xs, ys, xq, yq)`` torch tensors (NCHW images) from a :class:`jaxmeta.Task` batch."""
    (xs, ys), (xq, yq) = tasks
    img = lambda a: torch.tensor(np.asarray(a)).permute(0, 1, 4, 2, 3).contiguous().to(dtype)  # noqa: E731
    lab = lambda a: torch.tensor(np.asarray(a)).long()  # noqa: E731
    return img(xs), lab(ys), img(xq), lab(yq)


# --------------------------------------------------------------------------- meta-gradients


def loop_meta_grad(params: dict, data, *, lr: float = INNER_LR, backward: bool = True, act: Callable = F.relu):
    """learn2learn-style: per task, ``autograd.grad(create_graph=True)`` then ``backward``.

    ``params`` are leaf tensors with ``requires_grad``; with ``backward`` the
    meta-gradient accumulates in their ``.grad`` and the mean query loss is
    returned, otherwise ``(loss, grads dict)`` via ``autograd.grad``.
    """
    xs, ys, xq, yq = data
    n = xs.shape[0]
    names = list(params)
    total = 0.0
    grads = None
    for i in range(n):
        support_loss = F.cross_entropy(functional_forward(params, xs[i], act), ys[i])
        g = torch.autograd.grad(support_loss, [params[k] for k in names], create_graph=True)
        fast = {k: params[k] - lr * gk for k, gk in zip(names, g)}
        query_loss = F.cross_entropy(functional_forward(fast, xq[i], act), yq[i]) / n
        if backward:
            query_loss.backward()
        else:
            gi = torch.autograd.grad(query_loss, [params[k] for k in names])
            grads = list(gi) if grads is None else [a + b for a, b in zip(grads, gi)]
        total += float(query_loss.detach())
    if backward:
        return total
    return total, dict(zip(names, grads))


def func_meta_loss_fn(model: nn.Module, lr: float = INNER_LR):
    """``meta_loss(params, xs, ys, xq, yq)`` with ``torch.func`` (grad of grad, vmap over tasks)."""
    from torch.func import functional_call, grad, vmap

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    def task_loss(params, xs, ys, xq, yq):
        g = grad(loss)(params, xs, ys)
        fast = {k: params[k] - lr * g[k] for k in params}
        return loss(fast, xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean()

    return meta_loss


def func_meta_grad(model: nn.Module, params: dict, data, lr: float = INNER_LR) -> dict:
    from torch.func import grad

    return grad(func_meta_loss_fn(model, lr))(params, *data)


# --------------------------------------------------------------------------- checks


def rel_error(a: dict, b: dict) -> float:
    """``||a - b|| / ||b||`` over all leaves (float64)."""
    num = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)) for k in b)
    den = sum(float(np.sum(np.asarray(b[k], np.float64) ** 2)) for k in b)
    return math.sqrt(num / den)


def _np(d: dict) -> dict:
    return {k: v.detach().double().cpu().numpy() for k, v in d.items()}


def finite_difference_check(params32: dict, data32, *, tasks: int = 2, eps: float = 1e-5, seed: int = 0) -> dict:
    """Float64 checks on the first ``tasks`` tasks: the two styles against each other and against a
    central finite difference.

    The second-order MAML meta-loss of a ReLU network is *discontinuous*: the
    inner gradient jumps wherever a support activation crosses a ReLU kink,
    and the adapted weights jump with it, so a difference quotient does not
    converge (it grows as ``eps`` shrinks).  The finite-difference check is
    therefore made with a smooth activation (softplus) in the same code —
    that exercises every second-order term, batch norm's included; with the
    real ReLU the two styles are compared with each other in float64.
    """
    gen = torch.Generator().manual_seed(seed)
    data = tuple(d[:tasks].double() if d.is_floating_point() else d[:tasks] for d in data32)
    base = {k: v.detach().double().clone() for k, v in params32.items()}
    direction = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()}
    norm = math.sqrt(sum(float((d**2).sum()) for d in direction.values()))
    direction = {k: d / norm for k, d in direction.items()}

    def styles(act):
        _, g_loop = loop_meta_grad({k: v.clone().requires_grad_(True) for k, v in base.items()}, data,
                                   backward=False, act=act)
        g_func = func_meta_grad(Conv4(act=act).double(), {k: v.clone() for k, v in base.items()}, data)
        g_plain = func_meta_grad(Conv4(act=act, plain_bn=True).double(), {k: v.clone() for k, v in base.items()},
                                 data)
        return _np(g_loop), _np(g_func), _np(g_plain)

    out = {"tasks": tasks, "eps": eps, "dtype": "float64"}
    loop_relu, func_relu, plain_relu = styles(F.relu)
    out["relu_func_vs_loop_rel_error"] = rel_error(func_relu, loop_relu)
    out["relu_func_plain_bn_vs_loop_rel_error"] = rel_error(plain_relu, loop_relu)

    def meta_loss(p):
        total, _ = loop_meta_grad({k: v.clone().requires_grad_(True) for k, v in p.items()}, data,
                                  backward=False, act=F.softplus)
        return total

    plus = meta_loss({k: v + eps * direction[k] for k, v in base.items()})
    minus = meta_loss({k: v - eps * direction[k] for k, v in base.items()})
    fd = (plus - minus) / (2 * eps)
    loop_sp, func_sp, plain_sp = styles(F.softplus)
    out["softplus_fd_directional"] = fd
    for name, g in (("autograd_loop", loop_sp), ("torch_func", func_sp), ("torch_func_plain_bn", plain_sp)):
        d = float(sum(np.sum(g[k] * direction[k].numpy()) for k in direction))
        out[name] = {"softplus_directional": d, "rel_error_vs_fd": abs(d - fd) / max(abs(fd), 1e-30)}
    out["softplus_func_vs_loop_rel_error"] = rel_error(func_sp, loop_sp)
    data32 = tuple(d[:tasks] for d in data32)
    _, g32 = loop_meta_grad({k: v.detach().clone().requires_grad_(True) for k, v in params32.items()}, data32,
                            backward=False)
    out["float32_noise_rel_error"] = rel_error(_np(g32), loop_relu)
    return out


def jax_reference(seed: int = 0):
    """JAX's Conv4 parameters, a task batch sampled from a random image pool, and JAX's meta-gradient."""
    import jax
    import jax.numpy as jnp

    from jaxmeta.algorithms import maml_loss
    from jaxmeta.data.episodes import sample_tasks
    from jaxmeta.models import classification_loss, conv4_omniglot

    model = conv4_omniglot(WAYS)
    k_init, k_img, k_task = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = model.init(k_init, jnp.zeros((1, 28, 28, 1)))["params"]
    images = jax.random.uniform(k_img, (1200, 20, 28, 28, 1))
    tasks = sample_tasks(k_task, images, batch_size=BATCH, ways=WAYS, shots=SHOTS, queries=QUERIES)
    grads = jax.jit(lambda p, t: jax.grad(maml_loss, argnums=1)(
        classification_loss(model), p, t, steps=1, lr=INNER_LR, has_aux=True))(params, tasks)
    return params, tasks, jax.device_get(grads)


def gradient_checks(seed: int = 0) -> dict:
    """Both styles' meta-gradients against JAX's (float32, all 32 tasks, same weights and tasks), and the
    float64 checks of :func:`finite_difference_check`."""
    jparams, jtasks, jgrads = jax_reference(seed)
    params = params_from_jax(jparams)
    data = tasks_to_torch(jtasks)
    ref = grads_to_torch_layout(jgrads)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    _, g_loop = loop_meta_grad(leaves, data, backward=False)
    g_func = _np(func_meta_grad(Conv4(), {k: v.clone() for k, v in params.items()}, data))
    g_plain = _np(func_meta_grad(Conv4(plain_bn=True), {k: v.clone() for k, v in params.items()}, data))
    g_loop = _np(g_loop)
    fd = finite_difference_check(params, data, seed=seed)
    out = {"float64": fd, "loop_vs_jax_float32": rel_error(g_loop, ref)}
    for name, g in (("autograd_loop", g_loop), ("torch_func", g_func), ("torch_func_plain_bn", g_plain)):
        err = rel_error(g, ref)
        per_leaf = {k: rel_error({k: g[k]}, {k: ref[k]}) for k in ref}
        fd_err = fd[name]["rel_error_vs_fd"]
        # float32 sums over 32 tasks agree to ~1e-3; float64 checks must agree to ~1e-6.
        ok = err < 1e-2 and fd_err < 1e-4
        out[name] = {
            "rel_error_vs_jax_float32": err,
            "worst_leaf_vs_jax": max(per_leaf, key=per_leaf.get),
            "worst_leaf_rel_error": max(per_leaf.values()),
            "rel_error_vs_fd_float64_softplus": fd_err,
            "verdict": ("ok" if ok else "MISMATCH") + f": {err:.1e} off JAX (float32, 32 tasks), {fd_err:.1e} off "
                       f"a float64 finite difference (softplus, {fd['tasks']} tasks)",
            "ok": ok,
        }
    return out, params, data


# --------------------------------------------------------------------------- timing


def time_styles(
    params: dict,
    data,
    repeats: int = 5,
    log: Callable[[str], None] = print,
    others: dict[str, tuple[Callable[[], None], int]] | None = None,
) -> dict:
    """Times one full meta-step (meta-gradient + Adam) per style; ms per step.

    ``others`` adds more contestants, ``name -> (run, meta-steps per run)``
    (the JAX programs).  After one warm-up call each, the styles are timed
    round-robin, ``repeats`` rounds, so that all of them see the same load on
    a shared machine.
    """
    out = {}

    from torch.func import grad

    def func_style(plain_bn: bool):
        # (a) torch.func: functional_call + grad-of-grad + vmap over tasks, Adam on module parameters.
        model = Conv4(plain_bn=plain_bn)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        opt = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
        meta_grad = grad(func_meta_loss_fn(model))

        def func_step():
            p = {k: v.detach() for k, v in model.named_parameters()}
            g = meta_grad(p, *data)
            for name, param in model.named_parameters():
                param.grad = g[name]
            opt.step()

        return func_step

    # (b) learn2learn-style loop with create_graph=True and a backward per task.
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt_loop = torch.optim.Adam(list(leaves.values()), lr=OUTER_LR)

    def loop_step():
        opt_loop.zero_grad(set_to_none=True)
        loop_meta_grad(leaves, data)
        opt_loop.step()

    contestants = {"torch_func": (func_style(False), 1), "torch_func_plain_bn": (func_style(True), 1),
                   "autograd_loop": (loop_step, 1), **(others or {})}
    times: dict[str, list[float]] = {name: [] for name in contestants}
    log(f"warming up {', '.join(contestants)}")
    for name, (step, _) in list(contestants.items()):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - report, do not crash the benchmark
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            del contestants[name]
    for r in range(repeats):
        log(f"round {r + 1}/{repeats}")
        for name, (step, per_call) in contestants.items():
            t = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t) / per_call)
    for name, (_, per_call) in contestants.items():
        ms = [1e3 * t for t in times[name]]
        q25, q75 = np.percentile(ms, [25, 75])
        out[name] = {"ms_per_step": statistics.median(ms), "iqr": float(q75 - q25), "min": min(ms),
                     "max": max(ms), "n": len(ms), "steps_per_call": per_call}
    return out


def compare(
    repeats: int = 5,
    log: Callable[[str], None] = print,
    seed: int = 0,
    others: dict[str, tuple[Callable[[], None], int]] | None = None,
) -> dict:
    """Checks the torch styles' meta-gradients, then times them round-robin with ``others``.

    Returns a JSON-ready report; ``styles`` holds the torch styles, ``others``
    the extra contestants' timings.
    """
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; checking meta-gradients")
    checks, params, data = gradient_checks(seed)
    for name in ("torch_func", "torch_func_plain_bn", "autograd_loop"):
        log(f"{name}: {checks[name]['verdict']}")
    timed = time_styles(params, data, repeats, log, others)
    styles = {k: v for k, v in timed.items() if k in checks}
    for name, row in styles.items():
        row["grad_check"] = checks[name]
        if not checks[name]["ok"]:
            row["note"] = "meta-gradient does not match: timing reported but not trusted"
    return {
        "config": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "meta_batch": BATCH, "inner_steps": 1,
                   "inner_lr": INNER_LR, "outer": f"adam({OUTER_LR})", "second_order": True},
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "styles": styles,
        "others": {k: v for k, v in timed.items() if k not in checks},
        "float64_checks": checks["float64"],
        "note": "torch timings use one fixed, pre-sampled task batch (no sampling cost); JAX samples on the device "
                "inside the timed step and also computes the pre-adaptation query metrics",
    }
