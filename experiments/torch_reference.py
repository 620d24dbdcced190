"""PyTorch references of the exact second-order MAML meta-step, for ``benchmark --torch``.

Imported only when PyTorch is installed, and only by the processes that run a
PyTorch contestant (:mod:`experiments.contestant`): never beside a JAX
program.  The network is the Conv4 of :func:`jaxmeta.models.conv4_omniglot`:
four blocks of [3x3 conv with 64 filters, stride 2 and XLA's ``SAME`` padding,
no bias; batch norm with the batch's statistics and a learnable scale and
bias; ReLU], a spatial mean and a linear head.  The meta-step is any N-way
K-shot setting of an episode file (:func:`load_episode`): ``inner_steps`` SGD
steps on each task's support set with the exact second-order meta-gradient,
then Adam outside.  The styles (:data:`STYLES`):

* ``autograd_loop``: a learn2learn-style Python loop over tasks with
  ``torch.autograd.grad(create_graph=True)`` and ``backward`` per task;
* ``torch_func_plain_bn``: ``torch.func.functional_call`` + ``grad`` (grad of
  grad) + ``vmap`` over tasks, batch norm written in plain tensor ops (see
  :class:`PlainBatchNorm2d`);
* ``torch_func``: the same through ``F.batch_norm``, whose ``vmap`` of
  grad-of-grad is wrong in PyTorch 2.13 (timed, never trusted).

Before any timing is trusted, each style's meta-gradient is compared with
JAX's on identical weights and data, and with a central finite difference in
float64 (:func:`gradient_checks`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WAYS = 5
INNER_LR = 0.4
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


def loop_meta_grad(params: dict, data, *, lr: float = INNER_LR, steps: int = 1, backward: bool = True,
                   act: Callable = F.relu):
    """learn2learn-style: per task, ``steps`` inner steps with ``autograd.grad(create_graph=True)``, then
    ``backward``.

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
        fast = dict(params)
        for _ in range(steps):
            support_loss = F.cross_entropy(functional_forward(fast, xs[i], act), ys[i])
            g = torch.autograd.grad(support_loss, [fast[k] for k in names], create_graph=True)
            fast = {k: fast[k] - lr * gk for k, gk in zip(names, g)}
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


def func_meta_loss_fn(model: nn.Module, lr: float = INNER_LR, steps: int = 1):
    """``meta_loss(params, xs, ys, xq, yq)`` with ``torch.func`` (grad of grad, vmap over tasks)."""
    from torch.func import functional_call, grad, vmap

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    def task_loss(params, xs, ys, xq, yq):
        fast = params
        for _ in range(steps):
            g = grad(loss)(fast, xs, ys)
            fast = {k: fast[k] - lr * g[k] for k in fast}
        return loss(fast, xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean()

    return meta_loss


def func_meta_grad(model: nn.Module, params: dict, data, lr: float = INNER_LR, steps: int = 1) -> dict:
    from torch.func import grad

    return grad(func_meta_loss_fn(model, lr, steps))(params, *data)


# --------------------------------------------------------------------------- checks


def rel_error(a: dict, b: dict) -> float:
    """``||a - b|| / ||b||`` over all leaves (float64)."""
    num = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)) for k in b)
    den = sum(float(np.sum(np.asarray(b[k], np.float64) ** 2)) for k in b)
    return math.sqrt(num / den)


def _np(d: dict) -> dict:
    return {k: v.detach().double().cpu().numpy() for k, v in d.items()}


def finite_difference_check(params32: dict, data32, *, ways: int, lr: float, steps: int, tasks: int = 2,
                            eps: float = 1e-5, seed: int = 0, jax_grads64: dict | None = None) -> dict:
    """Float64 checks on the first ``tasks`` tasks: the styles against each other and against a
    central finite difference.

    The second-order MAML meta-loss of a ReLU network is *discontinuous*: the
    inner gradient jumps wherever a support activation crosses a ReLU kink,
    and the adapted weights jump with it, so a difference quotient does not
    converge (it grows as ``eps`` shrinks).  The finite-difference check is
    therefore made with a smooth activation (softplus) in the same code —
    that exercises every second-order term, batch norm's included; with the
    real ReLU the styles are compared with each other in float64, and with
    ``jax_grads64`` (JAX's float64 meta-gradient of the same tasks) when given.
    """
    gen = torch.Generator().manual_seed(seed)
    data = tuple(d[:tasks].double() if d.is_floating_point() else d[:tasks] for d in data32)
    base = {k: v.detach().double().clone() for k, v in params32.items()}
    direction = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()}
    norm = math.sqrt(sum(float((d**2).sum()) for d in direction.values()))
    direction = {k: d / norm for k, d in direction.items()}

    def styles(act):
        _, g_loop = loop_meta_grad({k: v.clone().requires_grad_(True) for k, v in base.items()}, data,
                                   lr=lr, steps=steps, backward=False, act=act)
        out = {"autograd_loop": _np(g_loop)}
        for name, plain in (("torch_func", False), ("torch_func_plain_bn", True)):
            model = Conv4(ways, act=act, plain_bn=plain).double()
            out[name] = _np(func_meta_grad(model, {k: v.clone() for k, v in base.items()}, data, lr, steps))
        return out

    out = {"tasks": tasks, "eps": eps, "dtype": "float64"}
    relu = styles(F.relu)
    out["relu_func_vs_loop_rel_error"] = rel_error(relu["torch_func"], relu["autograd_loop"])
    out["relu_func_plain_bn_vs_loop_rel_error"] = rel_error(relu["torch_func_plain_bn"], relu["autograd_loop"])
    if jax_grads64 is not None:
        out["relu_vs_jax_float64"] = {name: rel_error(g, jax_grads64) for name, g in relu.items()}
    # How far float32 alone moves this meta-gradient (a many-step ReLU meta-loss amplifies rounding).
    _, g32 = loop_meta_grad({k: v.detach().clone().requires_grad_(True) for k, v in params32.items()},
                            tuple(d[:tasks] for d in data32), lr=lr, steps=steps, backward=False)
    out["float32_noise_rel_error"] = rel_error(_np(g32), relu["autograd_loop"])

    def meta_loss(p):
        total, _ = loop_meta_grad({k: v.clone().requires_grad_(True) for k, v in p.items()}, data,
                                  lr=lr, steps=steps, backward=False, act=F.softplus)
        return total

    plus = meta_loss({k: v + eps * direction[k] for k, v in base.items()})
    minus = meta_loss({k: v - eps * direction[k] for k, v in base.items()})
    fd = (plus - minus) / (2 * eps)
    out["softplus_fd_directional"] = fd
    for name, g in styles(F.softplus).items():
        d = float(sum(np.sum(g[k] * direction[k].numpy()) for k in direction))
        out[name] = {"softplus_directional": d, "rel_error_vs_fd": abs(d - fd) / max(abs(fd), 1e-30)}
    return out


def load_episode(path: str):
    """``(meta, params, data, jax_grads)`` from an episode file written by ``benchmark --torch``.

    ``meta`` holds the setting (ways, shots, queries, meta_batch, inner_steps,
    inner_lr, outer_lr); ``params`` and ``jax_grads`` are in the torch layout
    (float32 tensors and float64 arrays), ``data`` is ``(xs, ys, xq, yq)``.
    """
    import json

    with np.load(path) as f:
        meta = json.loads(str(f["meta"]))
        tree = lambda prefix: {  # noqa: E731
            layer: {leaf: f[f"{prefix}/{layer}/{leaf}"] for leaf in ("kernel", "scale", "bias")
                    if f"{prefix}/{layer}/{leaf}" in f}
            for layer in [f"conv_{k}" for k in range(4)] + [f"bn_{k}" for k in range(4)] + ["head"]}
        params, grads = params_from_jax(tree("param")), grads_to_torch_layout(tree("grad"))
        meta["jax_grads_float64"] = grads_to_torch_layout(tree("grad64"))
        data = tasks_to_torch(((f["support_x"], f["support_y"]), (f["query_x"], f["query_y"])))
    return meta, params, data, grads


STYLES = ("autograd_loop", "torch_func_plain_bn", "torch_func")
"""The PyTorch contestants: the learn2learn-style loop, torch.func with plain-op batch norm, torch.func with
``F.batch_norm`` (its second order under vmap is wrong in 2.13: timed, never trusted)."""


def gradient_checks(meta: dict, params: dict, data, jax_grads: dict, seed: int = 0) -> dict:
    """Each style's meta-gradient against JAX's (float32, all tasks, same weights and tasks), and the
    float64 checks of :func:`finite_difference_check`."""
    ways, lr, steps = meta["ways"], meta["inner_lr"], meta["inner_steps"]
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = {"autograd_loop": _np(loop_meta_grad(leaves, data, lr=lr, steps=steps, backward=False)[1])}
    for name, plain in (("torch_func", False), ("torch_func_plain_bn", True)):
        grads[name] = _np(func_meta_grad(Conv4(ways, plain_bn=plain), {k: v.clone() for k, v in params.items()},
                                         data, lr, steps))
    fd = finite_difference_check(params, data, ways=ways, lr=lr, steps=steps, seed=seed,
                                 tasks=meta.get("check_tasks", 2), jax_grads64=meta.get("jax_grads_float64"))
    out = {"float64": fd}
    for name, g in grads.items():
        err = rel_error(g, jax_grads)
        fd_err = fd[name]["rel_error_vs_fd"]
        jax64 = fd.get("relu_vs_jax_float64", {}).get(name)
        # The verdict is made in float64, where correct gradients agree to rounding (~1e-10): with JAX's own
        # float64 meta-gradient (ReLU) and with a finite difference (softplus).  The float32 difference over all
        # tasks is reported beside it: over several inner steps a ReLU meta-loss amplifies float32 rounding.
        ok = fd_err < 1e-4 and (jax64 is None or jax64 < 1e-6)
        out[name] = {
            "rel_error_vs_jax_float32": err,
            "rel_error_vs_jax_float64": jax64,
            "rel_error_vs_fd_float64_softplus": fd_err,
            "verdict": ("ok" if ok else "MISMATCH") + (f": {jax64:.1e} off JAX in float64" if jax64 is not None
                                                       else "") + f", {fd_err:.1e} off a float64 finite "
                       f"difference (softplus, {fd['tasks']} tasks); float32 {err:.1e} off JAX "
                       f"({meta['meta_batch']} tasks; float32 alone moves it {fd['float32_noise_rel_error']:.1e})",
            "ok": ok,
        }
    return out


def make_step(style: str, meta: dict, params: dict, data) -> Callable[[], None]:
    """One full meta-step of ``style`` (meta-gradient + Adam on the parameters) as a closure."""
    ways, lr, steps, outer_lr = meta["ways"], meta["inner_lr"], meta["inner_steps"], meta["outer_lr"]
    if style == "autograd_loop":
        # learn2learn-style loop: create_graph=True and a backward per task.
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        opt = torch.optim.Adam(list(leaves.values()), lr=outer_lr)

        def loop_step():
            opt.zero_grad(set_to_none=True)
            loop_meta_grad(leaves, data, lr=lr, steps=steps)
            opt.step()

        return loop_step
    if style not in STYLES:
        raise ValueError(f"unknown torch style {style!r}; choose from {', '.join(STYLES)}")
    from torch.func import grad

    # torch.func: functional_call + grad-of-grad + vmap over tasks, Adam on the module's parameters.
    model = Conv4(ways, plain_bn=style == "torch_func_plain_bn")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
    meta_grad = grad(func_meta_loss_fn(model, lr, steps))

    def func_step():
        g = meta_grad({k: v.detach() for k, v in model.named_parameters()}, *data)
        for name, param in model.named_parameters():
            param.grad = g[name]
        opt.step()

    return func_step
