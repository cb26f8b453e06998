#!/usr/bin/python3
"""Differential tester of qkv against PyTorch.

Generates random expression graphs over qkv's differentiable ops, runs each in qkv (through
the difftest_run program, one process per batch) and in PyTorch with the same values, and
compares the output, every leaf's gradient, and whether each side refused the graph. A
disagreement is printed as a standalone C program and its PyTorch twin. Deliberate
differences are read from docs/robustness.md ("- difftest: <key>: <why>" lines); each key
switches the PyTorch side from torch's own behaviour to qkv's documented one for that case.

    difftest.py --runner build/tests/difftest/difftest_run --seed 1 --count 1500

Exits 0 when everything agrees, 1 with the repros otherwise, 77 when torch is missing. The
last line of the output is "N passed, N failed", counting graphs. tests/difftest/README.md
describes the graph format.
"""
import argparse
import math
import os
import random
import re
import resource
import subprocess
import sys
import time
import warnings

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("no python3-torch: difftest skipped")
    sys.exit(77)

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

TORCH_DTYPES = {"f32": torch.float32, "f64": torch.float64, "i64": torch.int64,
                "bool": torch.bool}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
QKV_DTYPE_ENUM = {"f32": 0, "f64": 1, "i64": 2, "bool": 3}
ENUM_DTYPE = {v: k for k, v in QKV_DTYPE_ENUM.items()}
C_DTYPES = {"f32": ("QKV_F32", "float"), "f64": ("QKV_F64", "double"),
            "i64": ("QKV_I64", "int64_t"), "bool": ("QKV_BOOL", "bool")}
# Tolerances: |qkv - torch| <= RTOL * |torch| + ATOL * max(1, largest |torch| in the tensor).
TOL = {"f64": (1e-9, 1e-12), "f32": (1e-4, 1e-5)}


# ---- Deliberate differences -------------------------------------------------------------

def deliberate_differences(path):
    """Keys of the '- difftest: <key>: <why>' lines of docs/robustness.md."""
    keys = set()
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"^- difftest: ([a-z0-9_]+): \S", line)
                if m:
                    keys.add(m.group(1))
    except OSError:
        pass
    return keys


# ---- Graph specs ------------------------------------------------------------------------

class Leaf:
    """A leaf: a base tensor of values, then view steps applied to it. With on_view the last
    view is the tensor that requires grad (a non-contiguous leaf); otherwise the base does."""

    def __init__(self, dtype, shape, values, rg=False, on_view=False, views=()):
        self.dtype, self.shape, self.values = dtype, list(shape), list(values)
        self.rg, self.on_view, self.views = rg, on_view, list(views)


class Op:
    def __init__(self, name, ins, ints=(), floats=()):
        self.name, self.ins, self.ints, self.floats = name, list(ins), list(ints), list(floats)


class Graph:
    """values: Leaf and Op entries; an Op's ins index earlier values. The output is the last
    value. passes: backward passes (all but the last with retain_graph). inner: the ops run in
    an inner scope and only the output is kept out of it."""

    def __init__(self, gid, values, seed_values=None, passes=1, inner=False):
        self.gid, self.values = gid, values
        self.seed_values, self.passes, self.inner = seed_values, passes, inner

    def size(self):
        n = 0
        for v in self.values:
            n += 10 + (len(v.values) if isinstance(v, Leaf) else 0)
        return n


def fmt_float(x):
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


def spec_text(g):
    """The graph in the runner's format. Leaves come first, so that with an inner scope
    every leaf outlives it."""
    order = [i for i, v in enumerate(g.values) if isinstance(v, Leaf)]
    order += [i for i, v in enumerate(g.values) if isinstance(v, Op)]
    pos = {old: new for new, old in enumerate(order)}
    lines = ["graph %s %d" % (g.gid, 1 if g.inner else 0)]
    for i in order:
        v = g.values[i]
        if isinstance(v, Leaf):
            words = ["leaf", v.dtype, str(len(v.shape))] + [str(s) for s in v.shape]
            words += [str(len(v.values))] + [fmt_float(x) for x in v.values]
            words += [str(int(v.rg)), str(int(v.on_view)), str(len(v.views))]
            for view in v.views:
                words += view_words(view)
            lines.append(" ".join(words))
        else:
            words = ["op", v.name, str(len(v.ins))] + [str(pos[k]) for k in v.ins]
            words += [str(len(v.ints))] + [str(k) for k in v.ints]
            words += [str(len(v.floats))] + [fmt_float(x) for x in v.floats]
            lines.append(" ".join(words))
    seed = g.seed_values or []
    lines.append("out %d %d %d %s" % (pos[len(g.values) - 1], g.passes, len(seed),
                                      " ".join(fmt_float(x) for x in seed)))
    lines.append("end")
    return "\n".join(lines) + "\n"


def view_words(view):
    kind, args = view[0], view[1:]
    if kind in ("E", "P", "R"):
        return [kind, str(len(args[0]))] + [str(x) for x in args[0]]
    return [kind] + [str(x) for x in args]


# ---- PyTorch side -------------------------------------------------------------------------

REDUCTIONS = ["mean", "sum", "none"]


def amax_first(x, axes, keepdim, is_max):
    """torch.amax/amin's values with the gradient to the first extreme element in row-major
    order (qkv's documented choice), by moving the reduced axes last and taking max(dim)."""
    ref = torch.amax(x.detach(), axes, keepdim) if is_max else torch.amin(x.detach(), axes,
                                                                          keepdim)
    nd = x.dim()
    if nd == 0:
        return x * 1
    red = sorted(set(a % nd for a in axes))
    keep = [d for d in range(nd) if d not in red]
    y = x.permute(keep + red)
    y = y.reshape([x.shape[d] for d in keep] + [math.prod(x.shape[d] for d in red)])
    v = (y.max(-1) if is_max else y.min(-1)).values
    return v.reshape(ref.shape)


def max_all_first(x, is_max):
    torch.max(x.detach()) if is_max else torch.min(x.detach())
    y = x.reshape(-1)
    return (y.max(0) if is_max else y.min(0)).values


def softmax_masked(x, axis, log):
    all_masked = (x.detach() == -math.inf).all(axis, keepdim=True) if x.dim() else \
        (x.detach() == -math.inf)
    # Fully masked rows are computed from zeros, so their NaN never reaches the backward.
    x = torch.where(all_masked, torch.zeros_like(x), x)
    s = torch.log_softmax(x, axis) if log else torch.softmax(x, axis)
    fill = torch.full_like(s, -math.inf if log else 0.0)
    return torch.where(all_masked, fill, s)


def index_select_nd(x, axis, idx):
    if x.dim() == 0:
        raise IndexError("qkv_index_select refuses a 0-d input")
    if idx.dim() == 1:
        return torch.index_select(x, axis, idx)
    nd = x.dim()
    if not -max(nd, 1) <= axis < max(nd, 1):
        raise IndexError("dim out of range")
    ax = axis % max(nd, 1)
    out = torch.index_select(x, ax, idx.reshape(-1))
    return out.reshape(list(x.shape[:ax]) + list(idx.shape) + list(x.shape[ax + 1:]))


def mse_loss_to_input(x, target, reduction):
    if math.prod(torch.broadcast_shapes(x.shape, target.shape)) != x.numel():
        raise RuntimeError("the target makes the result larger than the input")
    return F.mse_loss(x, target, reduction=reduction)


def var_none(x, corr):
    return torch.var(x.unsqueeze(-1), -1, correction=corr)


def var_0d_as_1d(x, dims, correction, keepdim):
    if x.dim() == 0 and all(d in (0, -1) for d in (dims if isinstance(dims, tuple) else (dims,))):
        return torch.var(x.reshape(1), 0, correction=correction)
    return torch.var(x, dims, correction=correction, keepdim=keepdim)


def matmul_promoted(a, b):
    dt = torch.promote_types(a.dtype, b.dtype)
    return torch.matmul(a.to(dt), b.to(dt))


def baddbmm_mirror(inp, a, b, alpha):
    """qkv_baddbmm: input + alpha * (a @ b) over matmul's operands (promoted), the input
    broadcast to the product and never widening it."""
    out = matmul_promoted(a, b) * alpha
    if inp is None:
        return out
    if tuple(torch.broadcast_shapes(inp.shape, out.shape)) != tuple(out.shape):
        raise RuntimeError("baddbmm: input does not broadcast to the product")
    return inp + out


def masked_fill_same_shape(x, mask, value):
    """qkv_masked_fill: the mask broadcasts to x, never x to the mask."""
    if tuple(torch.broadcast_shapes(x.shape, mask.shape)) != tuple(x.shape):
        raise RuntimeError("masked_fill: the mask does not broadcast to the input")
    return x.masked_fill(mask, value)


def matmul_tri_mirror(a, b, tri):
    """qkv_matmul_tri over the promoted operands: tril(a @ b), triu(a @ b), tril(a) @ b,
    triu(a) @ b (tri 1..4); both operands at least 2-D."""
    if a.dim() < 2 or b.dim() < 2:
        raise RuntimeError("matmul_tri: both operands must be matrices")
    if tri == 3:
        return matmul_promoted(torch.tril(a), b)
    if tri == 4:
        return matmul_promoted(torch.triu(a), b)
    out = matmul_promoted(a, b)
    return torch.tril(out) if tri == 1 else torch.triu(out)


def causal_softmax(x, past, all_masked_zero):
    """qkv_causal_softmax: softmax over the last axis with key j hidden from query i when
    j > past + i; rows with nothing left are zeros under softmax_all_masked."""
    if x.dim() < 2:
        raise RuntimeError("causal_softmax: scores must have two dimensions")
    L, S = x.shape[-2], x.shape[-1]
    hide = torch.arange(S).view(1, S) > torch.arange(L).view(L, 1) + past
    x = x.masked_fill(hide, -math.inf)
    return softmax_masked(x, -1, False) if all_masked_zero else torch.softmax(x, -1)


def max_dim(x, axis, keepdim, is_max):
    torch.max(x.detach(), axis)  # refuses what torch.max refuses
    idx = (x.detach().argmax if is_max else x.detach().argmin)(axis, keepdim=True)
    v = torch.gather(x, axis, idx)
    return v if keepdim or x.dim() == 0 else v.squeeze(axis)


def cross_entropy_masked(x, t, reduction, ignore_index, label_smoothing):
    """F.cross_entropy, with log_softmax's documented fully masked rows (all -inf)."""
    if not (x.detach() == -math.inf).all(1).any():
        return F.cross_entropy(x, t, reduction=reduction, ignore_index=ignore_index,
                               label_smoothing=label_smoothing)
    logp = softmax_masked(x, 1, True)
    nll = F.nll_loss(logp, t, reduction=reduction, ignore_index=ignore_index)
    if not label_smoothing:
        return nll
    keep = t != ignore_index
    smooth = torch.where(keep, -logp.sum(1), torch.zeros_like(logp[:, 0]))
    if reduction == "mean":
        smooth = smooth.sum() / keep.sum()
    elif reduction == "sum":
        smooth = smooth.sum()
    return (1 - label_smoothing) * nll + smooth * (label_smoothing / x.shape[1])


def linear_one_dtype(x, w, b=None):
    if x.dtype != w.dtype or (b is not None and b.dtype != x.dtype):
        raise RuntimeError("qkv_affine takes one float dtype, even for empty operands")
    return F.linear(x, w, b)


def silu_mul(a, b):
    return F.silu(a) * b


def bce_limit(x, t, reduction):
    if x.shape != t.shape:
        raise ValueError("Target size must be the same as input size")
    loss = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


HELPERS = {"amax_first": amax_first, "max_all_first": max_all_first,
           "softmax_masked": softmax_masked, "index_select_nd": index_select_nd,
           "var_none": var_none, "mse_loss_to_input": mse_loss_to_input,
           "var_0d_as_1d": var_0d_as_1d, "matmul_promoted": matmul_promoted,
           "bce_limit": bce_limit, "linear_one_dtype": linear_one_dtype,
           "cross_entropy_masked": cross_entropy_masked, "max_dim": max_dim,
           "silu_mul": silu_mul, "baddbmm_mirror": baddbmm_mirror,
           "masked_fill_same_shape": masked_fill_same_shape,
           "matmul_tri_mirror": matmul_tri_mirror, "causal_softmax": causal_softmax}
HELPER_SOURCE_NAMES = list(HELPERS)

UNARY = ["neg", "exp", "log", "sqrt", "rsqrt", "abs", "tanh", "sigmoid", "relu"]
# The activations and math of autograd.h's "Activations and more math": one argument, or a
# tensor and the op's doubles (clamp's NaN bound is None, as the C API defines it).
MATH_UNARY = {"silu": "F.silu({a})", "sin": "torch.sin({a})", "cos": "torch.cos({a})",
              "erf": "torch.erf({a})", "log1p": "torch.log1p({a})",
              "expm1": "torch.expm1({a})", "square": "torch.square({a})",
              "floor": "torch.floor({a})", "ceil": "torch.ceil({a})",
              "round": "torch.round({a})", "sign": "torch.sign({a})"}
MATH_PARAM = {"softplus": "F.softplus({a}, {f0}, {f1})", "leaky_relu": "F.leaky_relu({a}, {f0})",
              "elu": "F.elu({a}, {f0})", "clamp": "torch.clamp({a}, {b0}, {b1})"}
BINARY = {"add": "torch.add", "sub": "torch.sub", "mul": "torch.mul", "div": "torch.div",
          "pow": "torch.pow", "maximum": "torch.maximum", "minimum": "torch.minimum",
          "eq": "torch.eq", "ne": "torch.ne", "lt": "torch.lt", "le": "torch.le",
          "gt": "torch.gt", "ge": "torch.ge", "matmul": "torch.matmul", "silu_mul": "silu_mul"}
SCALAR = {"add_scalar": "({a} + {s})", "sub_scalar": "({a} - {s})",
          "rsub_scalar": "({s} - {a})", "mul_scalar": "({a} * {s})",
          "div_scalar": "({a} / {s})", "rdiv_scalar": "({s} / {a})",
          "pow_scalar": "torch.pow({a}, {s})", "eq_scalar": "torch.eq({a}, {s})",
          "ne_scalar": "torch.ne({a}, {s})", "lt_scalar": "torch.lt({a}, {s})",
          "le_scalar": "torch.le({a}, {s})", "gt_scalar": "torch.gt({a}, {s})",
          "ge_scalar": "torch.ge({a}, {s})"}
# max/min over an axis go through gather at the arg index: torch 1.13's own max(dim)
# backward can return uninitialised memory for a permuted input with a size-1 axis.
AXIS_OPS = {"sum": "torch.sum({a}, {ax}, {kd})", "mean": "torch.mean({a}, {ax}, {kd})",
            "max": "max_dim({a}, {ax}, {kd}, True)",
            "min": "max_dim({a}, {ax}, {kd}, False)",
            "argmax": "torch.argmax({a}, {ax}, {kd})", "argmin": "torch.argmin({a}, {ax}, {kd})"}


def py_float(x):
    if math.isnan(x):
        return "math.nan"
    if math.isinf(x):
        return "math.inf" if x > 0 else "-math.inf"
    return repr(float(x))


def py_expr(name, a, I, Fl, mirror):
    """The PyTorch expression for one op over input names a."""
    b = lambda v: "True" if v else "False"
    s = py_float(Fl[0]) if Fl else None
    if name in UNARY:
        return "torch.%s(%s)" % (name, a[0])
    if name in MATH_UNARY:
        return MATH_UNARY[name].format(a=a[0])
    if name in MATH_PARAM:
        f = list(Fl) + [0.0, 0.0]
        bound = lambda x: "None" if math.isnan(x) else py_float(x)
        return MATH_PARAM[name].format(a=a[0], f0=py_float(f[0]), f1=py_float(f[1]),
                                       b0=bound(f[0]), b1=bound(f[1]))
    if name == "matmul" and "matmul_promotes" in mirror:
        return "matmul_promoted(%s, %s)" % (a[0], a[1])
    if name in BINARY:
        return "%s(%s, %s)" % (BINARY[name], a[0], a[1])
    if name in SCALAR:
        return SCALAR[name].format(a=a[0], s=s)
    if name in ("maximum_scalar", "minimum_scalar"):
        if "maximum_scalar_ties" in mirror:
            fn = "torch.maximum" if name == "maximum_scalar" else "torch.minimum"
            return "%s(%s, torch.tensor(%s, dtype=%s.dtype))" % (fn, a[0], s, a[0])
        return "torch.clamp(%s, %s=%s)" % (a[0], "min" if name == "maximum_scalar" else "max",
                                           s)
    if name in AXIS_OPS:
        return AXIS_OPS[name].format(a=a[0], ax=I[0], kd=b(I[1]))
    if name in ("sum_axes", "mean_axes", "max_axes", "min_axes"):
        axes, kd = tuple(I[1:]), b(I[0])
        if not axes and "empty_axes" in mirror:
            return "(%s * 1)" % a[0]
        if name in ("max_axes", "min_axes"):
            is_max = name == "max_axes"
            if "max_axes_ties" in mirror:
                return "amax_first(%s, %r, %s, %s)" % (a[0], axes, kd, is_max)
            return "torch.%s(%s, %r, %s)" % ("amax" if is_max else "amin", a[0], axes, kd)
        return "torch.%s(%s, %r, %s)" % (name[:-5], a[0], axes, kd)
    if name in ("max_all", "min_all"):
        if "max_all_ties" in mirror:
            return "max_all_first(%s, %s)" % (a[0], name == "max_all")
        return "torch.%s(%s)" % (name[:3], a[0])
    if name in ("sum_all", "mean_all"):
        return "torch.%s(%s)" % (name[:-4], a[0])
    var = "var_0d_as_1d" if "var_0d_no_dof" in mirror else "torch.var"
    if name == "var":
        return "%s(%s, %d, correction=%d, keepdim=%s)" % (var, a[0], I[0], int(Fl[0]),
                                                          b(I[1]))
    if name == "var_axes":
        if len(I) == 1 and "empty_axes" in mirror:
            return "var_none(%s, %d)" % (a[0], int(Fl[0]))
        return "%s(%s, %r, correction=%d, keepdim=%s)" % (var, a[0], tuple(I[1:]),
                                                          int(Fl[0]), b(I[0]))
    if name in ("softmax", "log_softmax"):
        if "softmax_all_masked" in mirror:
            return "softmax_masked(%s, %d, %s)" % (a[0], I[0], name == "log_softmax")
        return "torch.%s(%s, %d)" % (name, a[0], I[0])
    if name == "gelu":
        return "F.gelu(%s, approximate=%r)" % (a[0], "tanh" if I[0] else "none")
    shape_ops = {
        "reshape": "torch.reshape({a}, {I!r})", "expand": "{a}.expand({I!r})",
        "permute": "{a}.permute({I!r})", "flatten": "torch.flatten({a}, {i0}, {i1})",
        "transpose": "torch.transpose({a}, {i0}, {i1})",
        "slice": "torch.ops.aten.slice({a}, {i0}, {i1}, {i2}, {i3})",
        "narrow": "torch.narrow({a}, {i0}, {i1}, {i2})",
        "select": "torch.select({a}, {i0}, {i1})", "squeeze": "torch.squeeze({a}, {i0})",
        "squeeze_all": "torch.squeeze({a})", "unsqueeze": "torch.unsqueeze({a}, {i0})",
        "contiguous": "{a}.contiguous()", "clone": "{a}.clone()",
    }
    if name in shape_ops:
        i = list(I) + [0] * 4
        return shape_ops[name].format(a=a[0], I=tuple(I), i0=i[0], i1=i[1], i2=i[2], i3=i[3])
    if name == "to_dtype":
        return "%s.to(torch.%s)" % (a[0], str(TORCH_DTYPES[ENUM_DTYPE[I[0]]])[6:])
    if name == "where":
        return "torch.where(%s, %s, %s)" % (a[0], a[1], a[2])
    if name == "masked_fill":
        if "masked_fill_keeps_shape" in mirror:
            return "masked_fill_same_shape(%s, %s, %s)" % (a[0], a[1], s)
        return "%s.masked_fill(%s, %s)" % (a[0], a[1], s)
    if name == "matmul_tri":
        return "matmul_tri_mirror(%s, %s, %d)" % (a[0], a[1], I[0])
    if name == "causal_softmax":
        return "causal_softmax(%s, %d, %s)" % (a[0], I[0], "softmax_all_masked" in mirror)
    if name == "baddbmm":
        inp = a[2] if len(a) > 2 else "None"
        if "baddbmm_broadcasts" in mirror:
            return "baddbmm_mirror(%s, %s, %s, %s)" % (inp, a[0], a[1], s)
        return "torch.baddbmm(%s, %s, %s, alpha=%s)" % (inp, a[0], a[1], s)
    if name == "affine":
        if "affine_one_dtype" in mirror:
            return "linear_one_dtype(%s)" % ", ".join(a)
        return "F.linear(%s)" % ", ".join(a)
    if name == "index_select":
        if "index_select_nd" in mirror:
            return "index_select_nd(%s, %d, %s)" % (a[0], I[0], a[1])
        return "torch.index_select(%s, %d, %s)" % (a[0], I[0], a[1])
    if name == "gather":
        return "torch.gather(%s, %d, %s)" % (a[0], I[0], a[1])
    if name in ("concat", "stack"):
        return "torch.%s([%s], %d)" % ("cat" if name == "concat" else "stack", ", ".join(a),
                                       I[0])
    if name == "cross_entropy":
        fn = "cross_entropy_masked" if "softmax_all_masked" in mirror else "F.cross_entropy"
        return "%s(%s, %s, reduction=%r, ignore_index=%d, label_smoothing=%s)" % (
            fn, a[0], a[1], REDUCTIONS[I[0]], I[1], s)
    if name == "nll_loss":
        return "F.nll_loss(%s, %s, reduction=%r, ignore_index=%d)" % (a[0], a[1],
                                                                     REDUCTIONS[I[0]], I[1])
    if name == "mse_loss" and "mse_target_broadcasts_to_input" in mirror:
        return "mse_loss_to_input(%s, %s, %r)" % (a[0], a[1], REDUCTIONS[I[0]])
    if name == "mse_loss":
        return "F.mse_loss(%s, %s, reduction=%r)" % (a[0], a[1], REDUCTIONS[I[0]])
    if name == "bce_with_logits" and "bce_infinite_logits" in mirror:
        return "bce_limit(%s, %s, %r)" % (a[0], a[1], REDUCTIONS[I[0]])
    if name == "bce_with_logits":
        return "F.binary_cross_entropy_with_logits(%s, %s, reduction=%r)" % (
            a[0], a[1], REDUCTIONS[I[0]])
    raise KeyError(name)


def view_py(view, a):
    kind, args = view[0], view[1:]
    if kind == "T":
        return "%s.transpose(%d, %d)" % (a, args[0], args[1])
    if kind == "N":
        return "%s.narrow(%d, %d, %d)" % (a, args[0], args[1], args[2])
    if kind == "S":
        return "torch.ops.aten.slice(%s, %d, %d, %d, %d)" % ((a,) + tuple(args))
    if kind == "E":
        return "%s.expand(%r)" % (a, tuple(args[0]))
    if kind == "P":
        return "%s.permute(%r)" % (a, tuple(args[0]))
    return "%s.reshape(%r)" % (a, tuple(args[0]))


EVAL_NS = {"torch": torch, "F": F, "math": math}
EVAL_NS.update(HELPERS)
_compiled = {}


def ev(expr, env):
    code = _compiled.get(expr)
    if code is None:
        code = _compiled[expr] = compile(expr, "<difftest>", "eval")
    return eval(code, EVAL_NS, env)


def leaf_tensors(v):
    """(the leaf's value as used by ops, the tensor whose gradient is reported)."""
    base = torch.tensor(v.values, dtype=TORCH_DTYPES[v.dtype]).reshape(v.shape)
    if v.rg and not v.on_view:
        base.requires_grad_(True)
    t = base
    for view in v.views:
        t = ev(view_py(view, "t"), {"t": t})
    if v.rg and v.on_view:
        t = t.detach().requires_grad_(True)
        return t, t
    return t, base if v.rg else None


def torch_forward(g, mirror):
    """Values of every graph entry, and the tensors whose gradients are reported. Raises
    what torch raises."""
    vals, grad_of = [], {}
    for i, v in enumerate(g.values):
        if isinstance(v, Leaf):
            t, gt = leaf_tensors(v)
            if gt is not None:
                grad_of[i] = gt
        else:
            names = ["v%d" % k for k in v.ins]
            env = {"v%d" % k: vals[k] for k in v.ins}
            t = ev(py_expr(v.name, names, v.ints, v.floats, mirror), env)
        vals.append(t)
    return vals, grad_of


def torch_result(g, mirror):
    """The same record the runner prints, from PyTorch."""
    try:
        vals, grad_of = torch_forward(g, mirror)
    except Exception as e:  # torch refuses with many exception types
        return {"status": "fwd_refused", "msg": "%s: %s" % (type(e).__name__, e)}
    out = vals[-1]
    res = {"status": "ok", "out": tensor_record(out.detach()), "grads": {}}
    if not out.requires_grad:
        res["status"] = "nograd"
        return res
    seed = torch.tensor(g.seed_values, dtype=out.dtype).reshape(out.shape)
    try:
        # A fresh seed per pass, and leaf gradients copied between passes: torch may make a
        # leaf's .grad a view of a gradient it computed and add the next pass into it in
        # place, changing the seed or another leaf's gradient with it.
        for p in range(g.passes):
            out.backward(seed.clone(), retain_graph=p + 1 < g.passes)
            for t in grad_of.values():
                if t.grad is not None:
                    t.grad = t.grad.clone()
    except Exception as e:
        res["status"] = "bwd_refused"
        res["msg"] = "%s: %s" % (type(e).__name__, e)
        return res
    for i, t in grad_of.items():
        res["grads"][i] = None if t.grad is None else tensor_record(t.grad)
    return res


def tensor_record(t):
    return (DTYPE_NAMES[t.dtype], list(t.shape),
            [float(x) for x in t.detach().reshape(-1).to(torch.float64).tolist()])


# ---- qkv side (the runner) ----------------------------------------------------------------

def parse_tensor(words):
    dtype, nd = words[0], int(words[1])
    shape = [int(x) for x in words[2:2 + nd]]
    numel = int(words[2 + nd])
    vals = [parse_hex(x) for x in words[3 + nd:3 + nd + numel]]
    return (dtype, shape, vals)


def parse_hex(s):
    s = s.lower()
    if s.lstrip("-+") in ("nan", "-nan"):
        return math.nan
    if s.lstrip("-+") == "inf":
        return -math.inf if s.startswith("-") else math.inf
    return float.fromhex(s)


def parse_runner_output(text, graphs):
    """Records by graph id for every graph the runner finished."""
    leaf_pos = {}
    for g in graphs:
        order = [i for i, v in enumerate(g.values) if isinstance(v, Leaf)]
        leaf_pos[g.gid] = {new: old for new, old in enumerate(order)}
    results, cur = {}, None
    for line in text.splitlines():
        words = line.split(" ")
        if words[0] == "graph":
            cur = {"status": "ok", "grads": {}}
            gid = words[1]
        elif cur is None:
            continue
        elif words[0] == "out":
            cur["out"] = parse_tensor(words[1:])
        elif words[0] in ("fwd_refused", "bwd_refused"):
            cur["status"] = words[0]
            cur["msg"] = line[len(words[0]) + 1:]
        elif words[0] in ("nograd", "seed_mismatch"):
            cur["status"] = words[0]
        elif words[0] == "grad":
            k = leaf_pos[gid][int(words[1])]
            cur["grads"][k] = None if words[2] == "none" else parse_tensor(words[2:])
        elif words[0] == "end":
            results[gid] = cur
            cur = None
    return results


RUNNER_STACK = 2 << 20


def small_stack():
    """A 2 MiB stack for the runner: qkv needs little (its backward is iterative by design),
    and a runaway recursion then crashes in milliseconds rather than after seconds of
    growing an 8 MiB stack."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft > RUNNER_STACK:
        resource.setrlimit(resource.RLIMIT_STACK, (RUNNER_STACK, hard))


def run_runner(runner, graphs, timeout=120):
    """Runs graphs in one process: (results by id, return code, stderr tail)."""
    text = "".join(spec_text(g) for g in graphs)
    try:
        p = subprocess.run([runner], input=text.encode(), capture_output=True,
                           timeout=timeout, preexec_fn=small_stack)
        out, rc, err = p.stdout.decode(errors="replace"), p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        rc, err = "timeout", e.stderr or b""
    return parse_runner_output(out, graphs), rc, err.decode(errors="replace")[-2000:]


def run_all(runner, graphs):
    """Results for every graph; a graph that crashes the runner is rerun alone to confirm,
    and gets a 'crashed' record, and the rest of its batch runs on in a new process."""
    results, todo = {}, list(graphs)
    while todo:
        res, rc, err = run_runner(runner, todo)
        results.update(res)
        if rc == 0:
            break
        crasher = next((g for g in todo if g.gid not in res), None)
        if crasher is None:
            break
        _, rc1, err1 = run_runner(runner, [crasher])
        how = "exit status %s" % rc1 if rc1 != 0 else \
            "exit status %s in a batch, though alone it runs" % rc
        results[crasher.gid] = {"status": "crashed", "msg": how,
                                "stderr": err1 if rc1 != 0 else err}
        todo = todo[todo.index(crasher) + 1:]
    return results


# ---- Comparison ---------------------------------------------------------------------------

def close(q, t, dtype):
    rtol, atol = TOL.get(dtype, (0, 0))
    scale = max([1.0] + [abs(x) for x in t if math.isfinite(x)])
    for a, b in zip(q, t):
        if math.isnan(a) or math.isnan(b):
            if not (math.isnan(a) and math.isnan(b)):
                return False
        elif math.isinf(a) or math.isinf(b):
            if a != b:
                return False
        elif abs(a - b) > rtol * abs(b) + atol * scale:
            return False
    return True


def compare_tensor(what, q, t, precision="f64"):
    if q is None and t is None:
        return None
    if q is None or t is None:
        # An unreached leaf: torch leaves its grad None, qkv may too, or give zeros.
        other = q if t is None else t
        if all(x == 0 for x in other[2]):
            return None
        return "%s: qkv %s, torch %s" % (what, "none" if q is None else "a tensor",
                                          "none" if t is None else "a tensor")
    if q[0] != t[0] or q[1] != t[1]:
        return "%s: qkv %s %s, torch %s %s" % (what, q[0], q[1], t[0], t[1])
    dtype = "f32" if "f32" in (t[0], precision) else t[0]
    if not close(q[2], t[2], dtype):
        bad = [i for i, (a, b) in enumerate(zip(q[2], t[2])) if not close([a], [b], dtype)]
        i = bad[0]
        return "%s: %d of %d elements differ, first at flat index %d: qkv %r, torch %r" % (
            what, len(bad), len(t[2]), i, q[2][i], t[2][i])
    return None


def precision(g):
    """f32 when any value of the graph is computed in f32 (the f32 tolerance then holds for
    every comparison, an f64 gradient that went through f32 included), else f64."""
    for v in g.values:
        if isinstance(v, Leaf) and v.dtype == "f32":
            return "f32"
        if isinstance(v, Op) and v.name == "to_dtype" and v.ints[0] == QKV_DTYPE_ENUM["f32"]:
            return "f32"
    return "f64"


def compare(q, t, prec="f64"):
    """None when qkv and torch agree, else a one-line reason."""
    if q is None:
        return "the runner printed nothing for this graph"
    if q["status"] == "crashed":
        return "qkv crashed (%s)" % q["msg"]
    qs, ts = q["status"], t["status"]
    if qs.endswith("refused") or ts.endswith("refused"):
        if qs.endswith("refused") and ts.endswith("refused"):
            return None
        if qs.endswith("refused"):
            return "qkv refused (%s: %s) but torch accepted" % (qs, q["msg"])
        return "torch refused (%s: %s) but qkv accepted" % (ts, t["msg"])
    r = compare_tensor("output", q.get("out"), t.get("out"), prec)
    if r:
        return r
    if qs != ts:
        return "qkv %s, torch %s" % (qs, ts)
    for k in sorted(set(q["grads"]) | set(t["grads"])):
        r = compare_tensor("gradient of leaf v%d" % k, q["grads"].get(k), t["grads"].get(k),
                           prec)
        if r:
            return r
    return None


# ---- Generator ----------------------------------------------------------------------------

def numel(shape):
    return math.prod(shape)


class Gen:
    def __init__(self, seed):
        self.r = random.Random(seed)

    # -- shapes and values

    def shape(self, max_nd=4):
        r = self.r
        nd = r.choices(range(max_nd + 1), [12, 25, 30, 20, 13][:max_nd + 1])[0]
        while True:
            s = [r.choices([0, 1, 2, 3, 4], [3, 25, 30, 30, 12])[0] for _ in range(nd)]
            if numel(s) <= 96:
                return s

    def values(self, n, dtype, kind):
        r = self.r
        out = []
        for _ in range(n):
            if kind == "positive":
                x = r.uniform(0.5, 2.0)
            elif kind == "grid":
                x = r.choice([-2, -1.5, -1, -0.5, 0, 0, 0.5, 1, 1.5, 2])
            elif kind == "exponent":
                x = r.uniform(-2, 2)
            elif kind == "unit":
                x = r.uniform(0, 1)
            else:
                x = r.gauss(0, 1.2)
            if dtype == "f32":
                x = float(torch.tensor(x, dtype=torch.float32))
            out.append(x)
        return out

    def views_to(self, shape):
        """(base shape, view steps) whose steps turn a base tensor into shape."""
        r = self.r
        cur, views = list(shape), []
        for _ in range(r.choices([0, 1, 2, 3], [30, 35, 25, 10])[0]):
            kinds = ["N", "S", "E", "R"] if cur else ["E", "R"]
            if len(cur) >= 2:
                kinds += ["T", "T", "P"]
            step = getattr(self, "view_" + r.choice(kinds))(cur)
            if step is None:
                continue
            cur, view = step
            views.insert(0, view)
        return cur, views

    def neg_axis(self, ax, nd):
        return ax - nd if self.r.random() < 0.3 else ax

    def view_T(self, cur):
        i, j = self.r.randrange(len(cur)), self.r.randrange(len(cur))
        prev = list(cur)
        prev[i], prev[j] = cur[j], cur[i]
        return prev, ("T", self.neg_axis(i, len(cur)), self.neg_axis(j, len(cur)))

    def view_P(self, cur):
        p = list(range(len(cur)))
        self.r.shuffle(p)
        prev = [0] * len(cur)
        for k, d in enumerate(p):
            prev[d] = cur[k]
        return prev, ("P", p)

    def view_N(self, cur):
        ax = self.r.randrange(len(cur))
        extra = self.r.randint(0, 2)
        start = self.r.randint(0, extra)
        prev = list(cur)
        prev[ax] += extra
        if start and self.r.random() < 0.3:
            start -= prev[ax]
        return prev, ("N", self.neg_axis(ax, len(cur)), start, cur[ax])

    def view_S(self, cur):
        r = self.r
        ax = r.randrange(len(cur))
        n = cur[ax]
        step, start = r.randint(2, 3), r.randint(0, 1)
        size = start + max(n - 1, 0) * step + (1 if n else 0) + r.randint(0, step - 1)
        for _ in range(20):
            end = r.choice([start + n * step, size, size + 5, start + max(n - 1, 0) * step + 1])
            s, e = start, end
            if r.random() < 0.3 and size:
                s, e = start - size, (end - size if end < size else end)
            if len(range(size)[s:e:step]) == n:
                prev = list(cur)
                prev[ax] = size
                return prev, ("S", self.neg_axis(ax, len(cur)), s, e, step)
        return None

    def view_E(self, cur):
        r = self.r
        lead = r.randint(0, min(2, len(cur))) if cur else 0
        prev = [1 if r.random() < 0.5 else s for s in cur[lead:]]
        want = [(-1 if r.random() < 0.3 and i >= lead else s) for i, s in enumerate(cur)]
        return prev, ("E", want)

    def view_R(self, cur):
        r = self.r
        prev = list(cur)
        choice = r.randrange(3)
        if choice == 0 and len(cur) >= 2:
            i = r.randrange(len(cur) - 1)
            prev[i:i + 2] = [cur[i] * cur[i + 1]]
        elif choice == 1 and len(cur) < 4:
            prev.insert(r.randint(0, len(cur)), 1)
        else:
            splits = [i for i, s in enumerate(cur) if s in (4, 6)]
            if not splits or len(cur) >= 4:
                return None
            i = r.choice(splits)
            prev[i:i + 1] = [2, cur[i] // 2]
        want = list(cur)
        if want and numel(cur) and r.random() < 0.3:
            want[r.randrange(len(want))] = -1
        return prev, ("R", want)

    def leaf(self, shape, dtype, kind=None, rg=None, hi=None):
        """A new leaf of the given shape, made non-contiguous at random."""
        r = self.r
        base, views = self.views_to(shape)
        n = numel(base)
        if dtype == "i64":
            vals = [float(r.randrange(hi)) for _ in range(n)]
        elif dtype == "bool":
            vals = [float(r.random() < 0.5) for _ in range(n)]
        else:
            kind = kind or r.choices(["normal", "grid"], [70, 30])[0]
            vals = self.values(n, dtype, kind)
        if rg is None:
            rg = dtype in ("f32", "f64") and r.random() < 0.8
        on_view = rg and bool(views) and r.random() < 0.3
        return Leaf(dtype, base, vals, rg, on_view, views)

    # -- graphs

    def graph(self, gid, mirror):
        r = self.r
        b = Builder(self, mirror, r.choices(["f64", "f32"], [65, 35])[0])
        b.add(self.leaf(self.shape(), b.dtype, rg=True))
        for _ in range(r.choices(range(1, 8), [15, 22, 20, 15, 12, 8, 8])[0]):
            if b.failed:
                break
            b.step()
        if not b.failed and r.random() < 0.05:
            b.invalid_op()
        return b.finish(gid)


class Builder:
    """Grows one graph, evaluating it in PyTorch as it goes so that each new op can be chosen
    to fit the shapes and to be well conditioned for the values it will see."""

    def __init__(self, gen, mirror, dtype):
        self.gen, self.r, self.mirror, self.dtype = gen, gen.r, mirror, dtype
        self.values, self.tensors, self.failed = [], [], False

    def add(self, v):
        """Appends a leaf or op and evaluates it; returns its index, or None when torch
        refuses it (the graph then ends there)."""
        try:
            if isinstance(v, Leaf):
                t = leaf_tensors(v)[0]
            else:
                names = ["v%d" % k for k in v.ins]
                env = {"v%d" % k: self.tensors[k] for k in v.ins}
                t = ev(py_expr(v.name, names, v.ints, v.floats, self.mirror), env)
        except Exception:
            self.values.append(v)
            self.tensors.append(None)
            self.failed = True
            return None
        self.values.append(v)
        self.tensors.append(t)
        return len(self.values) - 1

    def op(self, name, ins, ints=(), floats=()):
        if any(i is None for i in ins):
            return None  # an input was refused: the graph already ended there
        return self.add(Op(name, ins, ints, floats))

    def new_leaf(self, shape, kind=None, dtype=None, rg=None, hi=None):
        return self.add(self.gen.leaf(shape, dtype or self.dtype, kind, rg, hi))

    def cur(self):
        """The most recent float value, preferring those that depend on a leaf that requires
        grad."""
        cands = [i for i, t in enumerate(self.tensors)
                 if t is not None and t.is_floating_point()]
        grad = [i for i in cands if self.tensors[i].requires_grad]
        pool = grad or cands
        return pool[-1] if self.r.random() < 0.7 else self.r.choice(pool)

    def shape(self, i):
        return list(self.tensors[i].shape)

    def fdtype(self, i):
        return DTYPE_NAMES[self.tensors[i].dtype]

    def axis(self, nd, allow_bad=False):
        n = max(nd, 1)
        ax = self.r.randrange(n)
        return ax - n if self.r.random() < 0.35 else ax

    def bcast_shape(self, shape):
        """A shape that broadcasts with shape (sometimes to a larger result)."""
        r = self.r
        s = list(shape)
        if s and r.random() < 0.4:
            s = s[r.randint(0, len(s)):]
        s = [1 if r.random() < 0.3 else d for d in s]
        if len(s) < 4 and r.random() < 0.15:
            s = [r.randint(1, 3)] + s
        if r.random() < 0.15:
            out = list(shape)
            ones = [i for i, d in enumerate(out) if d == 1]
            if ones:
                s = list(out)
                s[r.choice(ones)] = r.randint(2, 3)
        return s

    def other_dtype(self, i):
        """Usually the value's own dtype; sometimes the other float dtype, to exercise
        promotion."""
        d = self.fdtype(i)
        if self.r.random() < 0.06:
            return "f64" if d == "f32" else "f32"
        return d

    def positive(self, i):
        """i itself when its values are all comfortably positive, else an op chain from i
        that is."""
        t = self.tensors[i].detach()
        if t.numel() == 0 or t.min().item() > 0.2:
            return i
        how = self.r.randrange(3)
        if how == 0:
            return self.op("add_scalar", [self.op("abs", [i])], [], [0.5])
        if how == 1:
            return self.op("exp", [self.op("tanh", [i])])
        return self.op("add_scalar", [self.op("sigmoid", [i])], [], [0.25])

    def bounded(self, i, limit=4.0):
        t = self.tensors[i].detach()
        if t.numel() and t.abs().max().item() > limit:
            return self.op("tanh", [i])
        return i

    # -- one random step

    def step(self):
        r = self.r
        kinds = ["unary", "unary", "binary", "binary", "scalar", "reduce", "reduce", "view",
                 "view", "matmul", "where", "index", "join", "loss", "edge", "softmax"]
        getattr(self, "gen_" + r.choice(kinds))()

    def gen_math(self, i):
        r = self.r
        name = r.choice(list(MATH_UNARY) + list(MATH_PARAM))
        if name == "log1p":
            self.op(name, [self.positive(i)])
        elif name in ("expm1", "square"):
            self.op(name, [self.bounded(i)])
        elif name == "softplus":
            self.op(name, [i], [], [r.choice([1.0, 2.0, 0.5, -1.0]), r.choice([20.0, 1.0, 0.0])])
        elif name == "leaky_relu":
            self.op(name, [i], [], [r.choice([0.01, 0.2, -0.5])])
        elif name == "elu":
            self.op(name, [i], [], [r.choice([1.0, 0.5, 2.0])])
        elif name == "clamp":
            nan = float("nan")
            self.op(name, [i], [], list(r.choice([(-0.5, 1.0), (0.0, nan), (nan, 0.25),
                                                  (1.0, -1.0)])))
        else:
            self.op(name, [i])

    def gen_unary(self):
        r = self.r
        i = self.cur()
        if r.random() < 0.35:
            return self.gen_math(i)
        name = r.choice(UNARY + ["gelu", "relu", "abs"])
        if name == "gelu":
            self.op("gelu", [i], [r.randint(0, 1)])
        elif name == "exp":
            self.op("exp", [self.bounded(i)])
        elif name in ("log", "sqrt", "rsqrt"):
            self.op(name, [self.positive(i)])
        else:
            self.op(name, [i])

    def gen_binary(self):
        r = self.r
        i = self.cur()
        name = r.choice(["add", "sub", "mul", "div", "pow", "maximum", "minimum", "silu_mul"])
        j = None
        cands = [k for k, t in enumerate(self.tensors) if k != i and t is not None and
                 t.is_floating_point() and self.broadcasts(self.shape(i), list(t.shape))]
        if cands and r.random() < 0.35:
            j = r.choice(cands)
        if name == "pow":
            i = self.positive(i)
            if j is None:
                j = self.new_leaf(self.bcast_shape(self.shape(i)), "exponent",
                                  self.other_dtype(i))
            else:
                j = self.op("tanh", [j])
        elif j is None:
            kind = "positive" if name == "div" else ("grid" if r.random() < 0.5 else None)
            j = self.new_leaf(self.bcast_shape(self.shape(i)), kind, self.other_dtype(i))
        elif name == "div":
            j = self.positive(j)
        if j is None or self.failed:
            return
        if r.random() < 0.3 and name != "pow" and name != "div":
            i, j = j, i
        self.op(name, [i, j])

    @staticmethod
    def broadcasts(a, b):
        for x, y in zip(reversed(a), reversed(b)):
            if x != y and x != 1 and y != 1:
                return False
        return True

    def gen_scalar(self):
        r = self.r
        i = self.cur()
        name = r.choice(["add_scalar", "sub_scalar", "rsub_scalar", "mul_scalar", "div_scalar",
                         "rdiv_scalar", "pow_scalar", "maximum_scalar", "minimum_scalar"])
        s = r.choice([0.0, 0.5, -1.0, 1.5, -0.25, 2.0, 3.0])
        if name == "div_scalar" and s == 0:
            s = 0.5
        if name == "rdiv_scalar":
            i = self.positive(i)
        if name == "pow_scalar":
            s = r.choice([2.0, 3.0, 0.5, -1.0, 1.5, -0.5])
            if s not in (2.0, 3.0):
                i = self.positive(i)
        if self.failed:
            return
        self.op(name, [i], [], [s])

    def gen_reduce(self):
        r = self.r
        i = self.cur()
        nd = len(self.shape(i))
        name = r.choice(["sum", "mean", "var", "max", "min", "sum_axes", "mean_axes",
                         "var_axes", "max_axes", "min_axes", "sum_all", "mean_all",
                         "max_all", "min_all"])
        kd = r.randint(0, 1)
        if name in ("sum", "mean", "max", "min"):
            self.op(name, [i], [self.axis(nd), kd])
        elif name == "var":
            self.op(name, [i], [self.axis(nd), kd], [float(r.choice([0, 1, 1, 2]))])
        elif name.endswith("_axes"):
            k = r.randint(0, max(nd, 1))
            axes = r.sample(range(max(nd, 1)), min(k, max(nd, 1))) if nd else \
                r.sample([0, -1], r.randint(0, 1))
            axes = [a - max(nd, 1) if r.random() < 0.3 else a for a in axes]
            floats = [float(r.choice([0, 1, 2]))] if name == "var_axes" else []
            self.op(name, [i], [kd] + axes, floats)
        else:
            self.op(name, [i])

    def gen_softmax(self):
        r = self.r
        i = self.cur()
        nd = len(self.shape(i))
        if r.random() < 0.25:
            # Positions set to -inf, as attention masks do; some rows may be all masked.
            m = self.new_leaf(self.bcast_mask(self.shape(i)), dtype="bool", rg=False)
            i = self.op("masked_fill", [i, m], [], [-math.inf])
            if i is None:
                return
        if nd >= 2 and r.random() < 0.2:
            self.op("causal_softmax", [i], [r.choice([0, 0, 1, 3])])
            return
        self.op(r.choice(["softmax", "log_softmax"]), [i], [self.axis(nd)])

    def bcast_mask(self, shape):
        return [1 if self.r.random() < 0.3 else d for d in shape][self.r.randint(0, len(shape)):]

    def gen_view(self):
        r = self.r
        i = self.cur()
        s = self.shape(i)
        nd = len(s)
        name = r.choice(["reshape", "flatten", "transpose", "permute", "slice", "narrow",
                         "select", "squeeze", "squeeze_all", "unsqueeze", "expand",
                         "contiguous", "clone", "to_dtype"])
        if name == "reshape":
            prev = self.gen.views_to(s)[0] if r.random() < 0.5 else [numel(s)]
            want = list(prev)
            if want and numel(prev) and r.random() < 0.3:
                want[r.randrange(len(want))] = -1
            self.op("reshape", [i], want)
        elif name == "flatten":
            a, b = sorted([r.randrange(max(nd, 1)), r.randrange(max(nd, 1))])
            self.op("flatten", [i], [self.neg(a, nd), self.neg(b, nd)])
        elif name == "transpose":
            self.op("transpose", [i], [self.axis(nd), self.axis(nd)])
        elif name == "permute":
            p = list(range(nd))
            r.shuffle(p)
            self.op("permute", [i], [self.neg(a, nd) for a in p])
        elif name in ("slice", "narrow", "select"):
            if nd == 0:
                self.op(name, [i], [0, 0, 1, 1][:{"slice": 4, "narrow": 3, "select": 2}[name]])
                return
            ax = r.randrange(nd)
            n = s[ax]
            if name == "slice":
                start = r.randint(-n - 1, n + 1)
                end = r.choice([r.randint(-n - 1, n + 2), 1 << 40])
                self.op("slice", [i], [self.neg(ax, nd), start, end, r.choice([1, 1, 2, 3])])
            elif name == "narrow":
                start = r.randint(0, n)
                length = r.randint(0, n - start)
                if start and r.random() < 0.3:
                    start -= n
                self.op("narrow", [i], [self.neg(ax, nd), start, length])
            elif n:
                self.op("select", [i], [self.neg(ax, nd), r.randint(-n, n - 1)])
        elif name == "squeeze":
            self.op("squeeze", [i], [self.axis(nd)])
        elif name == "unsqueeze":
            ax = r.randint(0, nd)
            self.op("unsqueeze", [i], [ax - nd - 1 if r.random() < 0.3 else ax])
        elif name == "expand":
            want = [r.randint(2, 3) if d == 1 and r.random() < 0.6 else d for d in s]
            want = [-1 if r.random() < 0.2 else d for d in want]
            if nd < 4 and r.random() < 0.4:
                want = [r.randint(1, 3)] + want
            self.op("expand", [i], want)
        elif name == "to_dtype":
            self.op("to_dtype", [i], [QKV_DTYPE_ENUM["f64" if self.fdtype(i) == "f32"
                                                     else "f32"]])
        else:
            self.op(name, [i])

    def neg(self, ax, nd):
        return ax - max(nd, 1) if self.r.random() < 0.3 else ax

    def gen_matmul(self):
        r = self.r
        i = self.cur()
        s = self.shape(i)
        if not s:
            i = self.op("reshape", [i], [1, 1] if r.random() < 0.5 else [1])
            if i is None:
                return
            s = self.shape(i)
        if len(s) > 4:
            return
        k = s[-1]
        n = r.randint(1, 3)
        if r.random() < 0.35:
            w = self.new_leaf([n, k], dtype=self.other_dtype(i))
            bias = [self.new_leaf([n])] if r.random() < 0.5 else []
            if self.failed:
                return
            self.op("affine", [i, w] + bias)
            return
        if len(s) == 1 or r.random() < 0.15:
            other = [k] if r.random() < 0.5 else [k, n]
        else:
            batch = s[:-2]
            batch = [1 if r.random() < 0.3 else d for d in batch][r.randint(0, len(batch)):]
            if len(batch) < 2 and r.random() < 0.2:
                batch = [r.randint(1, 2)] + batch
            other = batch + [k, n]
        j = self.new_leaf(other, dtype=self.other_dtype(i))
        if j is None:
            return
        if r.random() < 0.3 and len(other) >= 2:
            # The same product with the operands the other way round: x^T-like shapes.
            j = self.op("transpose", [j], [-1, -2])
            if j is None or self.shape(j)[-1] != (s[0] if len(s) == 1 else s[-2]):
                return
            self.op("matmul", [j, i])
            return
        if r.random() < 0.3:
            self.gen_baddbmm(i, j)
            return
        if r.random() < 0.2:
            self.op("matmul_tri", [i, j], [r.randint(1, 4)])
            return
        self.op("matmul", [i, j])

    def gen_baddbmm(self, i, j):
        """input + alpha * (i @ j), the input one row per matrix (which the GEMM adds as it
        stores), one row for all, the whole product's shape, a column, or none."""
        r = self.r
        alpha = r.choice([1.0, 0.5, -1.25, 0.125])
        try:
            out = list(baddbmm_mirror(None, self.tensors[i], self.tensors[j], 1.0).shape)
        except Exception:  # operands qkv must refuse as well
            self.op("baddbmm", [i, j], [], [alpha])
            return
        if not out:
            self.op("baddbmm", [i, j], [], [alpha])
            return
        n = out[-1]
        shapes = [None, [n], out, out[:-2] + [1, n] if len(out) >= 2 else [n],
                  out[:-1] + [1], [1] * (len(out) - 1) + [n]]
        shape = r.choice(shapes)
        inp = []
        if shape is not None:
            k = self.new_leaf(shape, dtype=r.choice([self.fdtype(i), self.dtype]))
            if k is None:
                return
            inp = [k]
        self.op("baddbmm", [i, j] + inp, [], [alpha])

    def gen_where(self):
        r = self.r
        i = self.cur()
        s = self.shape(i)
        if r.random() < 0.5:
            c = self.op(r.choice(["gt_scalar", "ge_scalar", "lt_scalar", "le_scalar",
                                  "eq_scalar", "ne_scalar"]), [i], [], [r.choice([0.0, 0.5])])
        else:
            c = self.new_leaf(self.bcast_mask(s), dtype="bool", rg=False)
        if c is None:
            return
        if r.random() < 0.4:
            self.op("masked_fill", [i, c], [], [r.choice([0.0, -1.5, 2.0])])
            return
        j = self.new_leaf(self.bcast_shape(s), dtype=self.other_dtype(i))
        if j is None:
            return
        ins = [c, i, j] if r.random() < 0.5 else [c, j, i]
        self.op("where", ins)

    def gen_index(self):
        r = self.r
        i = self.cur()
        s = self.shape(i)
        nd = len(s)
        if nd == 0 or r.random() < 0.1:
            ax = self.axis(nd)
            idx = self.new_leaf([r.randint(0, 2)], dtype="i64", rg=False, hi=1)
            if idx is not None:
                self.op(r.choice(["index_select", "gather"]), [i, idx], [ax])
            return
        ax = r.randrange(nd)
        n = s[ax]
        if n == 0:
            return
        if r.random() < 0.15:
            # Indices from argmax/argmin of values with ties: the first index, as in torch.
            src = self.new_leaf([r.randint(1, 3), n], "grid", rg=False)
            idx = self.op(r.choice(["argmax", "argmin"]), [src], [1, 0]) \
                if src is not None else None
            if idx is not None:
                self.op("index_select", [i, idx], [self.neg(ax, nd)])
            return
        if r.random() < 0.55:
            ishape = r.choice([[r.randint(0, 4)], [r.randint(0, 4)], [], [2, r.randint(1, 2)]])
            idx = self.new_leaf(ishape, dtype="i64", rg=False, hi=n)
            if idx is not None:
                self.op("index_select", [i, idx], [self.neg(ax, nd)])
        else:
            ishape = [r.randint(0, d) for d in s]
            ishape[ax] = r.randint(0, 4)
            idx = self.new_leaf(ishape, dtype="i64", rg=False, hi=n)
            if idx is not None:
                self.op("gather", [i, idx], [self.neg(ax, nd)])

    def gen_join(self):
        r = self.r
        i = self.cur()
        s = self.shape(i)
        nd = len(s)
        name = r.choice(["concat", "stack"])
        ins = [i]
        for _ in range(r.randint(1, 2)):
            o = list(s)
            if name == "concat" and nd:
                ax = r.randrange(nd)
                o[ax] = r.randint(0, 3)
            ins.append(self.new_leaf(o, dtype=self.other_dtype(i)))
        if self.failed:
            return
        if r.random() < 0.3:
            r.shuffle(ins)
        if name == "concat":
            # Sizes along every other axis agree only for the axis picked above; any
            # other axis is a shape error that both sides must refuse.
            diff = [a for a in range(nd) if len({self.shape(k)[a] for k in ins}) > 1]
            ax = diff[0] if diff else self.axis(nd)
            self.op("concat", ins, [self.neg(ax, nd) if diff else ax])
        else:
            ax = r.randint(0, nd)
            self.op("stack", ins, [ax - nd - 1 if r.random() < 0.3 else ax])

    def gen_loss(self):
        r = self.r
        i = self.cur()
        s = self.shape(i)
        red = r.randrange(3)
        name = r.choice(["cross_entropy", "nll_loss", "mse_loss", "bce_with_logits"])
        if name in ("cross_entropy", "nll_loss"):
            if len(s) != 2:
                i = self.op("reshape", [i], [-1, s[-1]] if s and s[-1] else [1, -1]) \
                    if numel(s) else None
                if i is None:
                    return
                s = self.shape(i)
            nrow, ncls = s
            if ncls == 0:
                return
            ignore = r.choice([-100, -100, 0, 1])
            t = self.new_leaf([nrow], dtype="i64", rg=False, hi=ncls)
            if t is None:
                return
            v = self.values[t]
            v.values = [float(ignore) if r.random() < 0.15 else x for x in v.values]
            self.tensors[t] = leaf_tensors(v)[0]
            if name == "cross_entropy":
                self.op(name, [i, t], [red, ignore], [r.choice([0.0, 0.0, 0.1])])
            else:
                lp = self.op("log_softmax", [i], [1])
                if lp is not None:
                    self.op(name, [lp, t], [red, ignore])
        elif name == "mse_loss":
            t = self.new_leaf(self.bcast_shape(s) if r.random() < 0.3 else s,
                              dtype=self.fdtype(i), rg=r.random() < 0.3)
            if t is not None:
                self.op(name, [i, t], [red])
        else:
            t = self.new_leaf(s, "unit", dtype=self.fdtype(i), rg=r.random() < 0.3)
            if t is not None:
                self.op(name, [i, t], [red])

    def gen_edge(self):
        """Points where PyTorch's exact choices matter: zeros into relu/sqrt chains, ties
        in max/maximum, 0-d tensors under axis arguments, size-1 axes with odd strides."""
        r = self.r
        kind = r.randrange(5)
        if kind == 0:
            x = self.new_leaf(self.gen.shape(), "grid", self.dtype, rg=True)
            if x is None:
                return
            z = r.choice([lambda: self.op("relu", [x]),
                          lambda: self.op("maximum_scalar", [x], [], [0.0]),
                          lambda: self.op("maximum", [x, self.new_leaf(
                              [], "grid", self.dtype, rg=False)])])()
            if z is not None:
                self.op(r.choice(["sqrt", "sqrt", "rsqrt", "log"]), [z])
        elif kind == 1:
            x = self.new_leaf([], None, self.dtype, rg=True)
            name = r.choice(["sum", "mean", "max", "min", "softmax", "log_softmax", "squeeze",
                             "unsqueeze", "transpose", "flatten", "var", "sum_axes"])
            ax = r.choice([0, -1])
            if name in ("sum", "mean", "max", "min"):
                self.op(name, [x], [ax, r.randint(0, 1)])
            elif name == "var":
                self.op(name, [x], [ax, r.randint(0, 1)], [0.0])
            elif name == "sum_axes":
                self.op(name, [x], [r.randint(0, 1), ax])
            elif name in ("transpose", "flatten"):
                self.op(name, [x], [ax, r.choice([0, -1])])
            else:
                self.op(name, [x], [ax])
        elif kind == 2:
            x = self.new_leaf(self.gen.shape(), "grid", self.dtype, rg=True)
            if x is None:
                return
            nd = len(self.shape(x))
            name = r.choice(["max", "min", "max_axes", "max_all", "min_all"])
            if name in ("max", "min"):
                self.op(name, [x], [self.axis(nd), r.randint(0, 1)])
            elif name == "max_axes":
                self.op(name, [x], [r.randint(0, 1)] + list(range(max(nd, 1)))[:r.randint(1, 2)])
            else:
                self.op(name, [x])
        else:
            # A leaf with size-1 axes whose strides are not the contiguous ones, into a
            # product: a [.., 1, k] viewed through reshapes and transposes.
            k, n = r.randint(1, 4), r.randint(1, 3)
            lead = [r.randint(1, 3)] + [1] * r.randint(0, 2)
            base = self.new_leaf(lead + [k, 1], None, self.dtype, rg=True)
            if base is None:
                return
            x = self.op("transpose", [base], [-1, -2])
            if x is None:
                return
            w = self.new_leaf([n, k], None, self.dtype)
            if w is None:
                return
            if r.random() < 0.5:
                self.op("affine", [x, w])
            else:
                self.op("matmul", [x, self.op("transpose", [w], [0, 1])])

    def invalid_op(self):
        """An op with a bad argument: both sides must refuse it."""
        r = self.r
        i = self.cur()
        s = self.shape(i)
        nd = len(s)
        kind = r.randrange(5)
        if kind == 0:
            self.op("sum", [i], [r.choice([max(nd, 1), -max(nd, 1) - 1]), 0])
        elif kind == 1:
            self.op("reshape", [i], [numel(s) + 1])
        elif kind == 2:
            j = self.new_leaf([d + 1 for d in s] or [2])
            if j is not None:
                self.op("add", [i, j])
        elif kind == 3:
            j = self.new_leaf([(s[-1] if s else 1) + 1, 2])
            if j is not None:
                self.op("matmul", [i, j])
        else:
            self.op("select", [i], [0, (s[0] if s else 1) + r.randint(0, 2)])

    def finish(self, gid):
        r = self.r
        out = self.tensors[-1]
        seed = None
        if out is not None:
            n = out.numel()
            seed = self.gen.values(n, DTYPE_NAMES.get(out.dtype, "f64"),
                                   "grid" if r.random() < 0.3 else "normal")
        passes = r.choices([1, 2], [85, 15])[0]
        return Graph(gid, self.values, seed, passes, inner=r.random() < 0.2)


# ---- Repros -------------------------------------------------------------------------------

def c_float(x, dtype):
    if math.isnan(x):
        return "NAN"
    if math.isinf(x):
        return "INFINITY" if x > 0 else "-INFINITY"
    if dtype in ("i64", "bool"):
        return str(int(x))
    return repr(float(x))


def c_shape(shape):
    if not shape:
        return "0, NULL"
    return "%d, (const int64_t[]){%s}" % (len(shape), ", ".join(str(s) for s in shape))


def c_array(dtype, vals):
    ctype = C_DTYPES[dtype][1]
    return "(const %s[]){%s}" % (ctype, ", ".join(c_float(x, dtype) for x in vals) or "0")


def c_ints(v):
    return "(const int[]){%s}" % (", ".join(str(x) for x in v) or "0")


def c_view(view, a):
    kind, args = view[0], view[1:]
    if kind == "T":
        return "qkv_transpose(%s, %d, %d)" % (a, args[0], args[1])
    if kind == "N":
        return "qkv_narrow(%s, %d, %d, %d)" % (a, args[0], args[1], args[2])
    if kind == "S":
        return "qkv_slice(%s, %d, %d, %d, %d)" % ((a,) + tuple(args))
    if kind == "E":
        return "qkv_expand(%s, %s)" % (a, c_shape(args[0]))
    if kind == "P":
        return "qkv_permute(%s, %s)" % (a, c_ints(args[0]))
    return "qkv_reshape(%s, %s)" % (a, c_shape(args[0]))


def c_expr(v, a):
    name, I, Fl = v.name, v.ints, v.floats
    b = lambda x: "true" if x else "false"
    s = c_float(Fl[0], "f64") if Fl else None
    if name in UNARY or name in MATH_UNARY or name in (
            "sum_all", "mean_all", "max_all", "min_all", "squeeze_all", "contiguous", "clone"):
        return "qkv_%s(%s)" % (name, a[0])
    if name in MATH_PARAM:
        f = [c_float(x, "f64") for x in list(Fl) + [0.0]]
        return "qkv_%s(%s, %s)" % (name, a[0], ", ".join(f[:max(len(Fl), 1)]))
    if name in BINARY:
        return "qkv_%s(%s, %s)" % (name, a[0], a[1])
    if name in ("rsub_scalar", "rdiv_scalar"):
        return "qkv_%s(%s, %s)" % (name, s, a[0])
    if name in SCALAR or name in ("maximum_scalar", "minimum_scalar"):
        return "qkv_%s(%s, %s)" % (name, a[0], s)
    if name in AXIS_OPS:
        return "qkv_%s(%s, %d, %s)" % (name, a[0], I[0], b(I[1]))
    if name in ("sum_axes", "mean_axes", "max_axes", "min_axes"):
        return "qkv_%s(%s, %d, %s, %s)" % (name, a[0], len(I) - 1, c_ints(I[1:]), b(I[0]))
    if name == "var":
        return "qkv_var(%s, %d, %s, %s)" % (a[0], I[0], s, b(I[1]))
    if name == "var_axes":
        return "qkv_var_axes(%s, %d, %s, %s, %s)" % (a[0], len(I) - 1, c_ints(I[1:]), s,
                                                     b(I[0]))
    if name in ("softmax", "log_softmax", "squeeze", "unsqueeze"):
        return "qkv_%s(%s, %d)" % (name, a[0], I[0])
    if name == "gelu":
        return "qkv_gelu(%s, %s)" % (a[0], b(I[0]))
    if name in ("reshape", "expand"):
        return "qkv_%s(%s, %s)" % (name, a[0], c_shape(I))
    if name == "permute":
        return "qkv_permute(%s, %s)" % (a[0], c_ints(I))
    if name in ("flatten", "transpose"):
        return "qkv_%s(%s, %d, %d)" % (name, a[0], I[0], I[1])
    if name == "slice":
        return "qkv_slice(%s, %d, %d, %d, %d)" % (a[0], I[0], I[1], I[2], I[3])
    if name == "narrow":
        return "qkv_narrow(%s, %d, %d, %d)" % (a[0], I[0], I[1], I[2])
    if name == "select":
        return "qkv_select(%s, %d, %d)" % (a[0], I[0], I[1])
    if name == "to_dtype":
        return "qkv_to_dtype(%s, %s)" % (a[0], C_DTYPES[ENUM_DTYPE[I[0]]][0])
    if name == "where":
        return "qkv_where(%s, %s, %s)" % tuple(a)
    if name == "masked_fill":
        return "qkv_masked_fill(%s, %s, %s)" % (a[0], a[1], s)
    if name == "affine":
        return "qkv_affine(%s, %s, %s)" % (a[0], a[1], a[2] if len(a) > 2 else "NULL")
    if name == "baddbmm":
        return "qkv_baddbmm(%s, %s, %s, %s)" % (a[2] if len(a) > 2 else "NULL", a[0], a[1], s)
    if name == "matmul_tri":
        return "qkv_matmul_tri(%s, %s, %d)" % (a[0], a[1], I[0])
    if name == "causal_softmax":
        return "qkv_causal_softmax(%s, %d)" % (a[0], I[0])
    if name in ("index_select", "gather"):
        return "qkv_%s(%s, %d, %s)" % (name, a[0], I[0], a[1])
    if name in ("concat", "stack"):
        return "qkv_%s(%d, (qkv_tensor *[]){%s}, %d)" % (name, len(a), ", ".join(a), I[0])
    red = ["QKV_REDUCTION_MEAN", "QKV_REDUCTION_SUM", "QKV_REDUCTION_NONE"]
    if name == "cross_entropy":
        return "qkv_cross_entropy(%s, %s, %s, %d, %s)" % (a[0], a[1], red[I[0]], I[1], s)
    if name == "nll_loss":
        return "qkv_nll_loss(%s, %s, %s, %d)" % (a[0], a[1], red[I[0]], I[1])
    if name == "mse_loss":
        return "qkv_mse_loss(%s, %s, %s)" % (a[0], a[1], red[I[0]])
    if name == "bce_with_logits":
        return "qkv_binary_cross_entropy_with_logits(%s, %s, %s)" % (a[0], a[1], red[I[0]])
    raise KeyError(name)


def c_program(g):
    L = ["/* difftest graph %s: cc prog.c $(pkg-config --cflags --libs qkv) */" % g.gid,
         "#include <math.h>", "#include <stdio.h>", "#include <qkv.h>", "",
         "static void show(const char *name, const qkv_tensor *t) {",
         "    printf(\"%s: \", name);", "    if (t) qkv_print(t); else printf(\"NULL\\n\");",
         "}", "", "int main(void) {", "    qkv_scope_begin();"]
    grads = []
    for i, v in enumerate(g.values):
        if not isinstance(v, Leaf):
            continue
        L.append("    qkv_tensor *b%d = qkv_from_array(%s, %s, %s);" % (
            i, C_DTYPES[v.dtype][0], c_shape(v.shape), c_array(v.dtype, v.values)))
        if v.rg and not v.on_view:
            L.append("    qkv_requires_grad_(b%d, true);" % i)
        expr = "b%d" % i
        for view in v.views:
            expr = c_view(view, expr)
        if v.on_view:
            L.append("    qkv_no_grad_begin();")
        L.append("    qkv_tensor *v%d = %s;" % (i, expr))
        if v.on_view:
            L.append("    qkv_no_grad_end();")
            L.append("    qkv_requires_grad_(v%d, true);" % i)
        if v.rg:
            grads.append((i, "v%d" % i if v.on_view else "b%d" % i))
    if g.inner:
        L.append("    qkv_scope_begin(); /* the ops run in an inner scope */")
    last = len(g.values) - 1
    for i, v in enumerate(g.values):
        if isinstance(v, Op):
            L.append("    qkv_tensor *v%d = %s;" % (i, c_expr(v, ["v%d" % k for k in v.ins])))
    if g.inner:
        L.append("    qkv_scope_end_keep(v%d);" % last)
    L.append("    if (qkv_error()) printf(\"forward error: %s\\n\", qkv_error());")
    L.append("    show(\"out\", v%d);" % last)
    if g.seed_values is not None:
        L.append("    if (v%d && v%d->requires_grad) {" % (last, last))
        L.append("        qkv_tensor *seed = qkv_to_dtype(qkv_from_array(QKV_F64, v%d->ndim, "
                 "v%d->shape," % (last, last))
        L.append("            %s), v%d->dtype);" % (c_array("f64", g.seed_values), last))
        for p in range(g.passes):
            L.append("        if (!qkv_backward_with(v%d, seed, %s))" % (
                last, "true" if p + 1 < g.passes else "false"))
            L.append("            printf(\"backward error: %s\\n\", qkv_error());")
        for i, name in grads:
            L.append("        show(\"grad of leaf v%d\", %s->grad);" % (i, name))
        L.append("    }")
    L += ["    qkv_scope_end();", "    return 0;", "}"]
    return "\n".join(L) + "\n"


def py_program(g, mirror):
    used = set()
    L = ["# difftest graph %s: the PyTorch twin" % g.gid, "import math",
         "import torch", "import torch.nn.functional as F"]
    body, grads = [], []
    for i, v in enumerate(g.values):
        if isinstance(v, Leaf):
            dt = str(TORCH_DTYPES[v.dtype])
            t = "torch.tensor([%s], dtype=%s).reshape(%r)" % (
                ", ".join(py_float(x) for x in v.values), dt, tuple(v.shape))
            if v.rg and not v.on_view:
                body.append("b%d = %s.requires_grad_()" % (i, t))
                grads.append((i, "b%d" % i))
            else:
                body.append("b%d = %s" % (i, t))
            expr = "b%d" % i
            for view in v.views:
                expr = view_py(view, expr)
            if v.on_view:
                expr += ".detach().requires_grad_()"
                grads.append((i, "v%d" % i))
            body.append("v%d = %s" % (i, expr))
        else:
            e = py_expr(v.name, ["v%d" % k for k in v.ins], v.ints, v.floats, mirror)
            used |= {h for h in HELPER_SOURCE_NAMES if h + "(" in e}
            body.append("v%d = %s" % (i, e))
    last = len(g.values) - 1
    body.append("print('out', v%d)" % last)
    if g.seed_values is not None:
        body.append("seed = torch.tensor([%s], dtype=v%d.dtype).reshape(v%d.shape)" % (
            ", ".join(py_float(x) for x in g.seed_values), last, last))
        for p in range(g.passes):
            body.append("v%d.backward(seed.clone()%s)" % (last, ", retain_graph=True"
                                                  if p + 1 < g.passes else ""))
            if p + 1 < g.passes:
                body += ["if %s.grad is not None: %s.grad = %s.grad.clone()" % (n, n, n)
                         for _, n in grads]
        for i, name in grads:
            body.append("print('grad of leaf v%d', %s.grad)" % (i, name))
    if used:
        import inspect
        L.append("# qkv's documented semantics (docs/robustness.md, deliberate differences)")
        for h in sorted(used):
            L.append(inspect.getsource(HELPERS[h]).rstrip())
    return "\n".join(L + body) + "\n"


# ---- Shrinking ----------------------------------------------------------------------------

def prefix_graph(g, k, gid):
    """The graph cut after value k, without the values its output does not read; the seed
    is made again to fit (with_seed)."""
    need, stack = set(), [k]
    while stack:
        i = stack.pop()
        if i not in need:
            need.add(i)
            if isinstance(g.values[i], Op):
                stack += g.values[i].ins
    keep = sorted(need)
    pos = {old: new for new, old in enumerate(keep)}
    values = []
    for i in keep:
        v = g.values[i]
        values.append(Op(v.name, [pos[j] for j in v.ins], v.ints, v.floats)
                      if isinstance(v, Op) else v)
    seed = g.seed_values if k == len(g.values) - 1 else None
    return Graph(gid, values, seed, g.passes, g.inner)


def with_seed(g, mirror, rnd):
    try:
        vals, _ = torch_forward(g, mirror)
        out = vals[-1]
        g.seed_values = [float(x) for x in
                         torch.tensor([rnd.uniform(-1, 1) for _ in range(out.numel())],
                                      dtype=out.dtype if out.is_floating_point()
                                      else torch.float64).tolist()]
    except Exception:
        g.seed_values = []
    return g


def shrink_all(runner, graphs, mirror):
    """For each graph, the smallest graph made from it that still disagrees: without the
    values its output does not read, cut after each op in turn, each also with one backward
    pass and no inner scope. All candidates run in one batch."""
    rnd = random.Random(0)
    cands = {}
    for g in graphs:
        cands[g.gid] = []
        for k in range(len(g.values)):
            if not (isinstance(g.values[k], Op) or k == len(g.values) - 1):
                continue
            c = prefix_graph(g, k, "%s.p%d" % (g.gid, k))
            if c.seed_values is None:
                with_seed(c, mirror, rnd)
            cands[g.gid].append(c)
            if c.passes != 1 or c.inner:
                cands[g.gid].append(Graph(c.gid + "s", c.values, c.seed_values, 1, False))
    res = run_all(runner, [c for cs in cands.values() for c in cs])
    best = {}
    for g in graphs:
        b, why = g, None
        for c in cands[g.gid]:
            w = compare(res.get(c.gid), torch_result(c, mirror), precision(c))
            if w and c.size() < b.size():
                b, why = c, w
        best[g.gid] = (b, why, res.get(b.gid))
    return best


def signature(why, g):
    """Failures alike enough to need only one repro: a refusal by its message with names,
    numbers and shapes blanked; any other disagreement by its kind and the op that made
    the output."""
    kind = re.sub(r"qkv_[a-z_]+|[a-z_]+\(\)", "OP", why)
    kind = re.sub(r"\[[^]]*\]|torch\.Size\(\[[^]]*\]\)|-?[0-9][0-9.e+-]*", "#", kind)
    last = g.values[-1]
    last = last.name if isinstance(last, Op) else "leaf"
    if "fwd_refused" in why or "crashed" in why:
        return kind
    if "bwd_refused" in why:
        return "%s [%s]" % (kind, last)
    kind = re.sub(r"elements differ.*", "elements differ", kind)
    return "%s [%s]" % (kind, last)


# ---- Main ---------------------------------------------------------------------------------

def describe(g):
    ops = [v.name for v in g.values if isinstance(v, Op)]
    return " -> ".join(ops) or "(a leaf)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runner", required=True, help="the built difftest_run program")
    ap.add_argument("--seed", type=int, action="append",
                    help="generator seed (repeatable); default 1")
    ap.add_argument("--count", type=int, default=1000, help="graphs per seed")
    ap.add_argument("--batch", type=int, default=500, help="graphs per runner process")
    ap.add_argument("--repros", type=int, default=8,
                    help="failures printed in full with their C and PyTorch programs")
    ap.add_argument("--robustness", default=os.path.join(ROOT, "docs", "robustness.md"))
    args = ap.parse_args()
    mirror = deliberate_differences(args.robustness)
    t0 = time.time()
    passed, failures = 0, []
    for seed in args.seed or [1]:
        gen = Gen(seed)
        graphs = [gen.graph("s%d.g%d" % (seed, n), mirror) for n in range(args.count)]
        for b in range(0, len(graphs), args.batch):
            batch = graphs[b:b + args.batch]
            res = run_all(args.runner, batch)
            for g in batch:
                why = compare(res.get(g.gid), torch_result(g, mirror), precision(g))
                if why:
                    failures.append((g, why, res.get(g.gid)))
                else:
                    passed += 1
    failures.sort(key=lambda f: f[0].size())
    for g, why, q in failures:
        print("FAIL %s: %s [%s]" % (g.gid, why, describe(g)))
    small = shrink_all(args.runner, [f[0] for f in failures], mirror)
    kinds = {}
    for g, why, q in failures:
        s, swhy, sq = small[g.gid]
        kinds.setdefault(signature(swhy or why, s), []).append((s, swhy or why, sq, g.gid))
    ordered = sorted(kinds.items(), key=lambda kv: -len(kv[1]))
    for n, (k, group) in enumerate(ordered[:args.repros]):
        s, why, sq, orig = min(group, key=lambda e: e[0].size())
        print("\n==== disagreement %d of %d kinds (%d graphs): graph %s, shrunk from %s (%s)" % (
            n + 1, len(kinds), len(group), s.gid, orig, describe(s)))
        print("why: %s" % why)
        if sq and sq.get("stderr"):
            print("runner stderr (tail):\n%s" % sq["stderr"].strip()[-600:])
        print("---- C (qkv) ----")
        print(c_program(s), end="")
        print("---- Python (PyTorch) ----")
        print(py_program(s, mirror), end="")
    if kinds:
        print("\n==== %d kinds of disagreement (graphs showing each):" % len(kinds))
        for k, group in ordered:
            example = min(group, key=lambda e: e[0].size())[0].gid
            print("%5d  %s  (e.g. %s)" % (len(group), k, example))
    print("difftest: %.1f s, deliberate differences honoured: %s" % (
        time.time() - t0, ", ".join(sorted(mirror)) or "none"))
    print("%d passed, %d failed" % (passed, len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
