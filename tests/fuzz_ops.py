"""Fuzz harness for the native ops: random and adversarial inputs, each batch in a subprocess.

Every op with a CPU kernel (nn_vote, average_linkage, average_linkage_precomputed, cluster_and_vote,
grid_average_linkage, bf16x6_mm; aggregate_clusters has none: the CPU runs ATen's ops) is called through its Python wrapper (insid3_fast.ops.*) and raw
(torch.ops.insid3_fast.*) with inputs drawn from: shapes 0, 1, odd and mismatched; non-contiguous,
transposed and expanded views; wrong dtypes and non-tensors; NaN, inf, huge, tiny (subnormal)
values; ties everywhere (constant or integer data, duplicated keys, the +-1/sqrt(C) equal-dot
construction); thresholds NaN, +-inf, negative, huge; connectivity not 4/8; sizes as numpy ints,
bools, floats, negative, overflowing int64 products.

Outcome of a case, checked against what the case was built to be:
  ok           returned; the result is checked (shapes, dtypes, label numbering, exact argmax
               against a Fraction reference, cluster_and_vote equal to its two ops, ...)
  input_error  wrappers: InputError with a message; raw ops: RuntimeError with a message
  oom          torch.OutOfMemoryError (allocation failure surfaced as an exception; only allowed
               for cases built to ask for huge allocations)
and failures: a crash (the batch's subprocess dies by a signal), a hang (batch timeout), another
exception type, an error on a valid input, a success on an invalid one, or a wrong result.

Usage:
  python tests/fuzz_ops.py                 # full run (make fuzz): 10,000 cases per (op, api)
  python tests/fuzz_ops.py --cases 300     # a bounded run (tests/test_fuzz_ops.py runs one)
Half of the cases run with INSID3_NN_VOTE=fp32, half with bf16. Work runs in subprocesses; when
one dies (a crash: signal, abort) the crash is counted with its case and the rest of the work
continues in a new subprocess. Exit status 0 when there is no crash and no failure. Each worker
caps its address space (--mem-gb) so that inputs asking for huge buffers fail with an exception
instead of exhausting the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from fractions import Fraction

OPS = ("nn_vote", "average_linkage", "average_linkage_precomputed", "cluster_and_vote", "grid_average_linkage",
       "bf16x6_mm")
APIS = ("wrapper", "raw")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Case generation (in the worker; deterministic in (seed, op, api, index)).


class Case:
    """args for the op, and what the case must give: 'ok', 'error' or 'any' (+ 'oom' allowed)."""

    def __init__(self, args, expect: str, note: str, oom_ok: bool = False):
        self.args, self.expect, self.note, self.oom_ok = args, expect, note, oom_ok


class Gen:
    def __init__(self, rng, api: str):
        import numpy as np
        import torch

        self.np, self.torch, self.rng, self.api = np, torch, rng, api
        self.raw = api == "raw"
        self.defects: list[str] = []

    def coin(self, p: float) -> bool:
        return self.rng.random() < p

    def dim(self) -> int:
        r = self.rng.random()
        if r < 0.08:
            return 0
        if r < 0.2:
            return 1
        return int(self.rng.choice([2, 3, 5, 7, 8, 9, 13, 16, 17, 31]))

    def values(self, shape, kind: str | None = None):
        """A float32 numpy array of one value family."""
        np, rng = self.np, self.rng
        kind = kind or str(rng.choice(["normal", "unit", "int", "const", "tiny", "mixed_scale", "pm"],
                                      p=[0.3, 0.2, 0.15, 0.1, 0.08, 0.09, 0.08]))
        n = int(np.prod(shape)) if len(shape) else 1
        if kind == "normal":
            x = rng.normal(size=n)
        elif kind == "unit":
            x = rng.normal(size=shape)
            if len(shape) and shape[-1] > 0:
                x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
            x = x.reshape(-1)
        elif kind == "int":
            x = rng.integers(-2, 3, size=n).astype(np.float64)
        elif kind == "const":
            x = np.full(n, float(rng.choice([0.0, 1.0, -0.5, 0.125])))
        elif kind == "tiny":
            x = rng.normal(size=n) * float(rng.choice([1e-38, 1e-42, 1e-45, 1e-20]))
        elif kind == "mixed_scale":
            x = rng.normal(size=n) * 10.0 ** rng.integers(-30, 12, size=n)
        else:  # +-1/sqrt(C): many exactly equal dots that double sums can separate
            c = shape[-1] if len(shape) and shape[-1] > 0 else 1
            x = rng.choice([-1.0, 1.0], size=n) / math.sqrt(c)
        return x.astype(np.float32).reshape(shape)

    def poison(self, x, what: str):
        """Maybe put a NaN, inf or huge value in x (a float32 array)."""
        np, rng = self.np, self.rng
        if x.size == 0 or not self.coin(0.15):
            return x
        x = x.copy()
        kind = str(rng.choice(["nan", "inf", "-inf", "huge", "max"]))
        idx = tuple(int(rng.integers(0, s)) for s in x.shape)
        if self.coin(0.3):
            idx = tuple(0 for _ in x.shape)  # the first element (key 0, row 0)
        if kind == "nan":
            x[idx] = np.nan
        elif kind == "inf":
            x[idx] = np.inf
        elif kind == "-inf":
            x[idx] = -np.inf
        elif kind == "huge":
            x[idx] = np.float32(rng.choice([1e16, 1e20, 1e30]))
        else:
            x[idx] = np.finfo(np.float32).max
        return x  # whether the values are acceptable is decided from the final tensors (value_defects)

    def tensor(self, x, what: str, *, allow_transposed: bool = True):
        """A torch tensor from a float32 array, with a random dtype and layout."""
        np, torch, rng = self.np, self.torch, self.rng
        t = torch.from_numpy(np.ascontiguousarray(x))
        r = rng.random()
        if r < 0.06:  # wrong dtypes
            dt = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
                  torch.bool, torch.complex64][int(rng.integers(0, 8))]
            if dt == torch.complex64:
                self.defects.append(f"{what}:complex")
                return t.to(dt)
            if dt in (torch.int64, torch.int32, torch.uint8, torch.bool):
                t = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-100, 100)
            if self.raw:
                self.defects.append(f"{what}:dtype")
            return t.to(dt)
        if r < 0.09:  # not a tensor at all
            self.defects.append(f"{what}:type")
            return [t.numpy(), t.tolist(), None, 3.0][int(rng.integers(0, 4))]
        if r < 0.25 and t.dim() >= 2 and allow_transposed:  # the transposed view of the transpose
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if r < 0.35 and t.dim() >= 1 and t.shape[0] > 0:  # a strided slice of a larger tensor
            big = torch.empty((t.shape[0] * 2,) + tuple(t.shape[1:]), dtype=t.dtype)
            big[::2] = t
            return big[::2]
        if r < 0.40 and t.dim() >= 1 and t.numel() > 0:  # an expanded (stride 0) view of one row
            return t[:1].expand_as(t)
        return t

    def bool_tensor(self, shape, what: str):
        np, torch, rng = self.np, self.torch, self.rng
        t = torch.from_numpy(rng.random(shape) < rng.random()) if len(shape) else torch.tensor(True)
        r = rng.random()
        if r < 0.05:
            if self.raw:
                self.defects.append(f"{what}:dtype")
            return t.float() if self.coin(0.5) else t.to(torch.uint8)
        if r < 0.07:
            self.defects.append(f"{what}:type")
            return t.numpy()
        if r < 0.15 and t.dim() == 2:
            return t.T.contiguous().T
        return t

    def threshold(self):
        np, rng = self.np, self.rng
        r = rng.random()
        if r < 0.6:
            return float(rng.uniform(0.0, 1.5))
        choices = [0.0, -1.0, 2.0, 1e30, float("inf"), float("-inf"), float("nan"), np.float32(0.4), np.float64(0.7),
                   np.int64(1), 1, True, "0.5", None, 10**400]
        t = choices[int(rng.integers(0, len(choices)))]
        if isinstance(t, float) and math.isnan(t):
            self.defects.append("threshold:nan")
        elif isinstance(t, bool):  # the wrappers refuse a bool; torch takes it as 1.0
            if not self.raw:
                self.defects.append("threshold:bool")
        elif isinstance(t, (str, type(None))):
            self.defects.append("threshold:type")
        elif isinstance(t, int) and t == 10**400 and self.raw:  # the wrappers take it as inf
            self.defects.append("threshold:int-overflow")
        return t


def _expect(gen: Gen) -> str:
    if any(not d.endswith("?") for d in gen.defects):
        return "error"
    return "any" if gen.defects else "ok"


def _values(x, raw: bool):
    """The float32 values an op sees for a float argument x, or None (a type/dtype defect)."""
    import torch

    if not isinstance(x, torch.Tensor) or x.is_complex() or (raw and x.dtype != torch.float32):
        return None
    return x.float()


def _nonfinite(v) -> bool:
    import torch

    return v is not None and not bool(torch.isfinite(v).all())


def _too_large(c: int, a, b) -> bool:
    """The documented rule: max|a|, max|b| or C * max|a| * max|b| >= 2^100 (dots could overflow)."""
    if a is None or b is None:
        return False
    am = float(a.abs().max()) if a.numel() else 0.0
    bm = float(b.abs().max()) if b.numel() else 0.0
    return max(float(c) * am * bm, am, bm) >= 2.0**100


def value_defects(op: str, raw: bool, args) -> list[str]:
    """NaN/inf and overflow defects of a case, from the tensors it actually passes."""
    out = []
    if op in ("nn_vote", "cluster_and_vote"):
        q, k = args[-4], args[-3]
        qv, kv = _values(q, raw), _values(k, raw)
        if _nonfinite(qv) or _nonfinite(kv):
            out.append("vote:nonfinite")
        elif qv is not None and kv is not None and qv.dim() == 2 and _too_large(qv.shape[-1], qv, kv):
            out.append("vote:too-large")
    if op in ("average_linkage", "cluster_and_vote", "grid_average_linkage", "average_linkage_precomputed"):
        f = _values(args[0], raw)
        if _nonfinite(f):
            out.append("values:nonfinite")
        elif op in ("average_linkage", "cluster_and_vote") and f is not None and f.dim() == 2 \
                and _too_large(f.shape[1], f, f):
            out.append("features:too-large")
    return out


def gen_nn_vote(gen: Gen):
    np, rng = gen.np, gen.rng
    Q, S, M, C = gen.dim(), int(rng.choice([0, 1, 1, 2, 3, 5])), gen.dim(), gen.dim()
    if M == 0 and S > 0:
        gen.defects.append("M=0")
    kind = None if gen.coin(0.7) else "const"
    q = gen.poison(gen.values((Q, C), kind), "queries")
    k = gen.poison(gen.values((S, M, C), kind), "keys")
    if S and M > 2 and gen.coin(0.3):
        k[:, M // 2] = k[:, 0]  # exact duplicates: ties to the lowest index
    shape_bug = rng.random()
    if shape_bug < 0.04:
        k = np.zeros((S, M, C + 1), np.float32)
        gen.defects.append("keys:C")
    elif shape_bug < 0.06:
        q = np.zeros((Q,), np.float32)
        gen.defects.append("queries:ndim")
    qt, kt = gen.tensor(q, "queries"), gen.tensor(k, "keys")
    mshape = (S, M) if not gen.coin(0.04) else (S, M + 1)
    if mshape != (S, M):
        gen.defects.append("key_mask:shape")
    mt = gen.bool_tensor(mshape, "key_mask")
    if gen.api == "wrapper" and gen.coin(0.2):
        at = None
    else:
        ashape = (Q,) if not gen.coin(0.04) else (Q + 1,)
        if ashape != (Q,):
            gen.defects.append("active:shape")
        at = gen.bool_tensor(ashape, "active")
    if gen.raw and at is None:
        at = gen.torch.ones(Q, dtype=gen.torch.bool)
    return Case((qt, kt, mt, at), _expect(gen), ",".join(gen.defects))


def gen_features(gen: Gen, n=None, what="features", op_c=None):
    np = gen.np
    n = gen.dim() if n is None else n
    C = gen.dim() if op_c is None else op_c
    x = gen.values((n, C))
    if gen.coin(0.7) and C > 0:
        nrm = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        x = (x / np.where(nrm > 0, nrm, 1.0)).astype(np.float32)
    x = gen.poison(x, what)
    if gen.coin(0.2):  # the transposed view of a (C, N) map, as the pipeline passes it
        return gen.torch.from_numpy(np.ascontiguousarray(x.T)).T
    return gen.tensor(x, what)


def gen_average_linkage(gen: Gen):
    if gen.coin(0.03):  # a wrong ndim
        gen.defects.append("features:ndim")
        return Case((gen.torch.zeros(int(gen.rng.integers(0, 4))), 0.5), "error", "ndim")
    if gen.coin(0.02):  # huge N with C = 0: N (N - 1) / 2 overflows int64, or the 68+ GB
        # distance buffer cannot be allocated (an OutOfMemoryError, under the worker's cap)
        n = int(gen.rng.choice([2**17, 2**18, 2**31, 2**32 + 1, 2**40, 2**62]))
        return Case((gen.torch.empty(n, 0), 0.5), "error", "huge-N", oom_ok=True)
    f = gen_features(gen)
    t = gen.threshold()
    return Case((f, t), _expect(gen), ",".join(gen.defects))


def gen_precomputed(gen: Gen):
    np, rng = gen.np, gen.rng
    n = gen.dim()
    kind = rng.random()
    if kind < 0.5:
        x = rng.normal(size=(n, 4))
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    elif kind < 0.8:
        d = rng.integers(0, 4, size=(n, n)).astype(np.float64)
        d = d + d.T
    else:
        d = rng.random((n, n)) * 10.0 ** float(rng.integers(-40, 38))
    np.fill_diagonal(d, 0.0)
    d = gen.poison(d.astype(np.float32), "dist")
    if gen.coin(0.04):
        d = np.zeros((n, n + 1), np.float32)
        gen.defects.append("dist:square")
    dt = gen.tensor(d, "dist")
    t = gen.threshold()
    return Case((dt, t), _expect(gen), ",".join(gen.defects))


def gen_cluster_and_vote(gen: Gen):
    if gen.coin(0.01):  # a distance buffer too large to allocate
        one = gen.torch.ones(1, 1)
        return Case((gen.torch.empty(2**17, 0), 0.5, one, one[None], gen.torch.ones(1, 1, dtype=gen.torch.bool),
                     gen.torch.ones(1, dtype=gen.torch.bool)), "error", "huge-N", oom_ok=True)
    f = gen_features(gen)
    t = gen.threshold()
    vote = gen_nn_vote(gen)
    return Case((f, t) + tuple(vote.args), _expect(gen), ",".join(gen.defects))


def gen_grid(gen: Gen):
    np, rng, torch = gen.np, gen.rng, gen.torch
    h, w = gen.dim(), gen.dim()
    C = gen.dim()
    x = gen.values((h * w, C))
    if gen.coin(0.6) and C > 0:
        nrm = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        x = (x / np.where(nrm > 0, nrm, 1.0)).astype(np.float32)
    x = gen.poison(x, "features")
    f = gen.tensor(x, "features")
    conn = 4 if gen.coin(0.5) else 8
    r = rng.random()
    if r < 0.05:  # not 4 or 8 (True is 1 for torch, refused by the wrapper)
        conn = [0, 3, 6, -4, 16, 4.0, True, "4", None, 2**70][int(rng.integers(0, 10))]
        gen.defects.append("connectivity")
    elif r < 0.1:
        conn = np.int64(conn)
    hh, ww = h, w
    r = rng.random()
    if r < 0.04:  # the overflowing product of issue 12 and friends
        hh, ww = [(4, 2**62 + 1), (2**32, 2**32), (2**62 + 1, 4), (-1, -h * w if h * w else -4),
                  (2**63, 1), (2**64 + 4, 1), (0, 2**63)][int(rng.integers(0, 7))]
        if gen.coin(0.5):
            hh, ww = (np.int64(v) if -2**63 <= v < 2**63 else v for v in (hh, ww))
        gen.defects.append("hw:overflow")
    elif r < 0.08:
        hh = [float(h), True, np.float64(h), str(h), None, np.bool_(True)][int(rng.integers(0, 6))]
        if gen.raw and isinstance(hh, bool):  # torch takes True as 1
            if w != h * w:
                gen.defects.append("hw:mismatch")
        elif gen.raw and isinstance(hh, np.bool_):
            gen.defects.append("h:numpy-bool?")  # up to torch's argument parser
        else:
            gen.defects.append("h:type")
    elif r < 0.12:
        hh, ww = w + 1, h  # mismatched sizes
        if hh * ww != h * w:
            gen.defects.append("hw:mismatch")
    elif r < 0.15:
        hh, ww = np.int64(h), np.int32(w)  # numpy ints are ints
    t = gen.threshold()
    return Case((f, hh, ww, conn, t), _expect(gen), ",".join(gen.defects))


def gen_bf16x6_mm(gen: Gen):
    torch, rng = gen.torch, gen.rng
    r = rng.random()
    if r < 0.02:  # M * P overflows int64 (empty operands: nothing to allocate before the check)
        return Case((torch.empty(2**40, 0), torch.empty(0, 2**40)), "error", "M*P-overflow")
    if r < 0.03:  # an output too large to allocate (under the worker's cap), or refused
        return Case((torch.empty(2**17, 0), torch.empty(0, 2**17)), "any", "huge-out", oom_ok=True)
    M, K, P = gen.dim(), gen.dim(), gen.dim()
    kb = K
    if gen.coin(0.04):
        kb = K + 1
        gen.defects.append("inner:K")
    a = gen.tensor(gen.poison(gen.values((M, K)), "a"), "a")
    b = gen.tensor(gen.poison(gen.values((kb, P)), "b"), "b")
    if gen.coin(0.03):
        a = a.reshape(-1) if isinstance(a, torch.Tensor) else a
        gen.defects.append("a:ndim")
    return Case((a, b), _expect(gen), ",".join(gen.defects))


def check_mm(out, a, b):
    """Shape and dtype; NaN rows/columns where an operand's row/column is not finite; elsewhere
    within a float32 GEMM's error of the float64 product (entries whose |a| |b| could overflow
    float32 are only checked for shape). Below 2^-126 the parts are bf16 subnormals, multiples of
    2^-133, and the products float32 subnormals: an absolute error of 2^-133 per operand entry
    (times the other operand) and 6 K 2^-149."""
    import torch

    a32, b32 = a.float(), b.float()
    M, P = a32.shape[0], b32.shape[1]
    assert out.dtype == torch.float32 and out.shape == (M, P), (out.dtype, out.shape)
    bad_rows, bad_cols = ~torch.isfinite(a32).all(1), ~torch.isfinite(b32).all(0)
    assert bool(out[bad_rows].isnan().all()) and bool(out[:, bad_cols].isnan().all()), "non-finite operand, no NaN"
    good = ~bad_rows[:, None] & ~bad_cols[None, :]
    a64, b64 = torch.where(torch.isfinite(a32), a32, 0).double(), torch.where(torch.isfinite(b32), b32, 0).double()
    ref, mag = a64 @ b64, a64.abs() @ b64.abs()
    check = good & (mag <= 2.0**120)
    err = (out.double() - ref).abs()
    K = a32.shape[1]
    bound = 2.0**-20 * mag + 2.0**-133 * (a64.abs() @ torch.ones_like(b64) + torch.ones_like(a64) @ b64.abs()) \
        + 6 * K * 2.0**-149
    assert bool((err[check] <= bound[check]).all()), f"error {float((err - bound)[check].max())} over the bound"


GENERATORS = {"nn_vote": gen_nn_vote, "average_linkage": gen_average_linkage,
              "average_linkage_precomputed": gen_precomputed, "cluster_and_vote": gen_cluster_and_vote,
              "grid_average_linkage": gen_grid, "bf16x6_mm": gen_bf16x6_mm}


# ---------------------------------------------------------------------------------------------
# Result checks.


def _exact_argmax(q, keys):
    """Exact argmax over keys (M, C) of <key, q> (float32 numpy), ties to the lowest index."""
    import numpy as np

    prods = keys.astype(np.float64) * q.astype(np.float64)[None]  # exact
    fs = [math.fsum(r) for r in prods]  # correctly rounded: the exact max is among the fsum maxima
    best = max(fs)
    top = [j for j, v in enumerate(fs) if v == best]
    if len(top) == 1:
        return top[0]
    exact = [sum((Fraction(float(v)) for v in prods[j]), Fraction(0)) for j in top]
    m = max(exact)
    return top[exact.index(m)]


def check_vote_result(out, queries, keys, key_mask, active, budget: list[int]):
    import torch

    votes, argmax = out
    Q, S, M = queries.shape[0], keys.shape[0], keys.shape[1]
    assert votes.dtype == torch.int32 and votes.shape == (Q,), (votes.dtype, votes.shape)
    assert argmax.dtype == torch.int64 and argmax.shape == (S, Q), (argmax.dtype, argmax.shape)
    act = torch.ones(Q, dtype=torch.bool) if active is None else active.bool()
    mask = key_mask.bool()
    assert bool((argmax[:, ~act] == -1).all()) and bool((votes[~act] == 0).all())
    a = argmax[:, act]
    assert bool(((a >= 0) & (a < M)).all()), "argmax out of range"
    if S and int(act.sum()):
        hits = torch.gather(mask.long(), 1, a).sum(0)
        assert torch.equal(hits.int(), votes[act]), "votes differ from the masks at the argmax"
    work = Q * S * M * max(queries.shape[1], 1)
    if budget[0] > 0 and work <= 4000:  # exact reference for small cases
        budget[0] -= work
        qn, kn = queries.float().numpy(), keys.float().numpy()
        for s in range(S):
            for qi in range(Q):
                if act[qi]:
                    assert int(argmax[s, qi]) == _exact_argmax(qn[qi], kn[s]), f"argmax[{s},{qi}] not exact"


def check_labels(labels, n):
    import torch

    assert labels.dtype == torch.int64 and labels.shape == (n,), (labels.dtype, labels.shape)
    nxt = 0
    for v in labels.tolist():  # numbered by first appearance
        assert 0 <= v <= nxt, "labels not numbered by first appearance"
        nxt = max(nxt, v + 1)


def check_result(op: str, api: str, args, out, budget):
    import torch

    from insid3_fast import ops

    impl = torch.ops.insid3_fast if api == "raw" else ops
    if op == "nn_vote":
        check_vote_result(out, *args, budget)
    elif op in ("average_linkage", "average_linkage_precomputed"):
        check_labels(out, args[0].shape[0])
    elif op == "grid_average_linkage":
        check_labels(out, args[0].shape[0])
    elif op == "bf16x6_mm":
        check_mm(out, *args)
    elif op == "cluster_and_vote":
        labels, votes, argmax = out
        f, t, q, k, m, a = args
        check_labels(labels, f.shape[0])
        check_vote_result((votes, argmax), q, k, m, a, budget)
        assert torch.equal(labels, impl.average_linkage(f, t)), "labels differ from average_linkage"
        v2, a2 = impl.nn_vote(q, k, m, a)
        assert torch.equal(votes, v2) and torch.equal(argmax, a2), "vote differs from nn_vote"


# ---------------------------------------------------------------------------------------------
# Worker: a list of work items (op, api, start, count) in this process.


def _mem_limit(gb: float) -> None:
    import resource

    if gb <= 0:
        return
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize"))
    lim = vm + int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))


def run_cases(op: str, api: str, seed: int, start: int, count: int) -> dict:
    import numpy as np
    import torch

    from insid3_fast import ops
    from insid3_fast.errors import InputError

    fn = getattr(torch.ops.insid3_fast, op) if api == "raw" else getattr(ops, op)
    counts = {"ok": 0, "input_error": 0, "oom": 0}
    failures = []
    budget = [200_000]
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, OPS.index(op), APIS.index(api), i])
        gen = Gen(rng, api)
        case = GENERATORS[op](gen)
        vd = value_defects(op, api == "raw", case.args)
        if vd:
            case.expect, case.note = "error", ",".join(filter(None, [case.note] + vd))
        print(f"case {op} {api} {i}", file=sys.stderr, flush=True)
        try:
            out = fn(*case.args)
        except torch.OutOfMemoryError as exc:
            kind, msg = "oom", str(exc)
            ok = case.oom_ok and bool(msg)
        except InputError as exc:
            kind, msg = "input_error", str(exc)
            ok = api == "wrapper" and bool(msg) and case.expect != "ok"
        except RuntimeError as exc:
            kind, msg = "input_error", str(exc)
            ok = api == "raw" and bool(msg) and case.expect != "ok"
        except Exception as exc:  # noqa: BLE001 - any other type is a failure
            kind, msg, ok = f"other:{type(exc).__name__}", str(exc), False
        else:
            kind, msg = "ok", ""
            ok = case.expect != "error"
            if ok:
                try:
                    check_result(op, api, case.args, out, budget)
                except Exception as exc:  # noqa: BLE001 - an assertion or a malformed result
                    ok, msg, kind = False, f"wrong result: {type(exc).__name__}: {exc}", "wrong"
        if ok:
            counts[kind] += 1
        else:
            failures.append({"op": op, "api": api, "case": i, "kind": kind, "expect": case.expect,
                             "note": case.note, "message": msg.split("\n")[0][:300]})
    return {"counts": counts, "failures": failures}


def worker(items: list[tuple[str, str, int, int]], seed: int, mem_gb: float) -> None:
    """Runs the items in order; prints one JSON line per finished item (so a crash loses none)."""
    import torch

    sys.path.insert(0, ROOT)
    import insid3_fast.ops  # noqa: F401  (registers the ops)

    torch.set_num_threads(int(os.environ.get("FUZZ_THREADS", "2")))
    _mem_limit(mem_gb)
    for op, api, start, count in items:
        res = run_cases(op, api, seed, start, count)
        print(json.dumps({"item": [op, api, start, count], **res}, default=str), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver: work items in subprocesses; after a crash the rest of the work runs in a new one.


def run_items(items, seed, mem_gb, timeout, env):
    """Returns (results, crash): results of the finished items; crash = (op, api, case, why) or None."""
    spec = ";".join(f"{op},{api},{start},{count}" for op, api, start, count in items)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--seed", str(seed), "--mem-gb", str(mem_gb)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode() if isinstance(b, bytes) else (b or "")
        out, err, rc = text(exc.stdout), text(exc.stderr), None
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if rc == 0:
        return results, None
    last = [line.split() for line in err.splitlines() if line.startswith("case ")]
    why = "timeout" if rc is None else (f"signal {-rc}" if rc < 0 else f"exit {rc}")
    rest = " | ".join(line for line in err.splitlines() if not line.startswith("case "))[-300:]
    if not last:
        return results, ("?", "?", -1, f"{why} before the first case: {rest}")
    _, op, api, i = last[-1]
    return results, (op, api, int(i), f"{why}: {rest}")


def drive(cases: int, batch: int, seed: int, mem_gb: float, timeout: float, pairs, quiet: bool = False) -> dict:
    """Runs `cases` cases per (op, api) pair, `batch` cases per work item, the items of all pairs
    in as few subprocesses as crashes allow. Returns per-pair totals with failure examples."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    summary = {f"{op}/{api}": {"ok": 0, "input_error": 0, "oom": 0, "crash": 0, "failures": 0, "examples": []}
               for op, api in pairs}
    t0 = time.time()
    for mode in ("fp32", "bf16"):  # nn_vote's two pre-filters (fp32 / bf16 GEMM), half the cases each
        env["INSID3_NN_VOTE"] = mode
        lo, hi = (0, cases // 2) if mode == "fp32" else (cases // 2, cases)
        todo = [(op, api, s, min(batch, hi - s)) for op, api in pairs for s in range(lo, hi, batch)]
        while todo:
            results, crash = run_items(todo, seed, mem_gb, timeout, env)
            for r in results:
                op, api, start, count = r["item"]
                tot = summary[f"{op}/{api}"]
                for k, v in r["counts"].items():
                    tot[k] += v
                tot["failures"] += len(r["failures"])
                tot["examples"].extend(r["failures"][: max(0, 5 - len(tot["examples"]))])
                todo.remove((op, api, start, count))
            if crash is None:
                break
            op, api, i, why = crash
            if i < 0:
                raise SystemExit(f"fuzz worker failed to start: {why}")
            tot = summary[f"{op}/{api}"]
            tot["crash"] += 1
            tot["examples"].append({"op": op, "api": api, "case": i, "mode": mode, "crash": why})
            # The crashed item's results were lost: its cases before the crash run again (they
            # are deterministic), the crashing case is counted, the rest follows.
            item = next(it for it in todo if it[0] == op and it[1] == api and it[2] <= i < it[2] + it[3])
            k = todo.index(item)
            start, end = item[2], item[2] + item[3]
            todo[k:k + 1] = [it for it in ((op, api, start, i - start), (op, api, i + 1, end - i - 1)) if it[3] > 0]
        if not quiet:
            print(f"[{mode} done, {time.time() - t0:.0f}s]", flush=True)
    if not quiet:
        for key, tot in summary.items():
            print(f"{key:38s} ok={tot['ok']:6d} input_error={tot['input_error']:6d} oom={tot['oom']:3d} "
                  f"crashes={tot['crash']} failures={tot['failures']}")
            for e in tot["examples"][:5]:
                print("   ", json.dumps(e, default=str)[:400])
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_000, help="cases per (op, api)")
    ap.add_argument("--batch", type=int, default=2500, help="cases per work item")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--mem-gb", type=float, default=3.0, help="address space each worker may add (0: no cap)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--apis", default=",".join(APIS))
    ap.add_argument("--worker", metavar="ITEMS", help="internal: op,api,start,count;...")
    a = ap.parse_args(argv)
    if a.worker:
        items = [(op, api, int(s), int(c)) for op, api, s, c in (it.split(",") for it in a.worker.split(";"))]
        worker(items, a.seed, a.mem_gb)
        return 0
    pairs = [(op, api) for op in a.ops.split(",") for api in a.apis.split(",")]
    summary = drive(a.cases, a.batch, a.seed, a.mem_gb, a.timeout, pairs)
    total = {k: sum(v[k] for v in summary.values()) for k in ("ok", "input_error", "oom", "crash", "failures")}
    print("total:", json.dumps(total))
    return 0 if total["crash"] == 0 and total["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
