"""Source tracing (``pyra_bench.models.merging.trace_sources``): hand-worked 4x4 examples for ToMe, DiffRate
and SPViT, every patch in exactly one group (or dropped) at every block, the model's own token sizes as an
independent count, PYRA's modulation strength against the paper's equations, and tracing that changes no
logit and does no work when off."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pyra_bench.methods.diffrate import DiffRateReducer, merge_into_kept, sort_by_importance
from pyra_bench.methods.spvit import SPViTSelector
from pyra_bench.models import ToMeMerge, build_model
from pyra_bench.models.merging import SourceTrace, TokenReducer, bipartite_matching, merge_wavg, trace_sources
from pyra_bench.models.pyra import MODULATORS, build_modulator

PATCHES = 16  # a 4x4 patch grid behind one class token


def groups_of(block, b: int = 0) -> set[frozenset[int]]:
    """The traced groups of image ``b`` as sets of patch indices (dropped patches left out)."""
    g = block.groups[b].tolist()
    return {frozenset(p for p in range(len(g)) if g[p] == t) for t in set(g) - {-1}}


def one_hot(n: int, dim: int, rows: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """(1, n, dim): token t is the unit vector e_t unless ``rows`` gives it."""
    x = torch.eye(n, dim, dtype=torch.float64)
    for t, v in (rows or {}).items():
        x[t] = v
    return x[None]


def step(trace: SourceTrace, reducer: TokenReducer, x, size, q, k):
    reducer.trace = trace
    x, size = reducer(x, size, q, k)
    trace.end_block(x.shape[1])
    return x, size


def assert_partition(trace: SourceTrace, num_prefix: int = 1) -> None:
    """Every patch is held by exactly one token in range, or dropped (-1); prefix tokens hold none."""
    for blk in trace.blocks:
        assert blk.groups.shape[1] == PATCHES or blk.groups.shape[1] > 0
        assert ((blk.groups == -1) | ((blk.groups >= num_prefix) & (blk.groups < blk.tokens))).all()
        assert not (blk.fused & (blk.groups == -1)).any(), "a fused patch is held by a token"


# ---------------------------------------------------------------------------------------------------------
# hand-worked examples
# ---------------------------------------------------------------------------------------------------------
def test_tome_groups_on_a_hand_built_4x4_grid():
    """Token t = patch t-1. Block 0 (r=3): the A tokens 2i+2 (patch 2i+1) point at the B tokens 2i+1 (patch
    2i) with cosine 1.0, 0.9, ..., 0.3, so patches 1/3/5 join 0/2/4. Block 1 (r=2) on the 14 tokens left
    (kept A: class, patches 7, 9, 11, 13, 15 = tokens 0-5; then B: {0,1}, {2,3}, {4,5}, 6, 8, 10, 12, 14 =
    tokens 6-13): token 6 ({0,1}, in A) copies token 7's key ({2,3}, in B: cosine 1) and token 4 (patch 13)
    leans to token 5 (patch 15: cosine 0.71); every other pair is orthogonal."""
    dim = 32
    rows = {}
    for i in range(8):
        c = 1.0 - 0.1 * i
        rows[2 * i + 1] = torch.eye(dim, dtype=torch.float64)[i]
        rows[2 * i + 2] = c * torch.eye(dim, dtype=torch.float64)[i] + math.sqrt(1 - c * c) * torch.eye(
            dim, dtype=torch.float64)[8 + i]
    rows[0] = torch.eye(dim, dtype=torch.float64)[31]
    k0 = one_hot(17, dim, rows)[:, None]  # (B, H=1, N, d)
    x = torch.randn(1, 17, 8, dtype=torch.float64)
    trace = SourceTrace(num_prefix=1)
    trace.start(x)
    x, size = step(trace, ToMeMerge(3), x, None, None, k0)
    assert groups_of(trace.blocks[0]) == {frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5})} | {
        frozenset({p}) for p in range(6, 16)}
    e = torch.eye(dim, dtype=torch.float64)
    k1 = one_hot(14, dim, {6: e[7], 4: (e[4] + e[5]) / math.sqrt(2)})[:, None]
    x, size = step(trace, ToMeMerge(2), x, size, None, k1)
    assert groups_of(trace.blocks[1]) == {frozenset({0, 1, 2, 3}), frozenset({4, 5}), frozenset({13, 15})} | {
        frozenset({p}) for p in (6, 7, 8, 9, 10, 11, 12, 14)}
    assert [b.tokens for b in trace.blocks] == [14, 12]
    # kept A after block 1: class, tokens 2, 8, 10, 12 (5 of them); B token 7 ({0..3}) is B's 4th -> token 8
    assert trace.blocks[1].groups[0, :4].tolist() == [8, 8, 8, 8]
    assert_partition(trace)
    counts = torch.bincount(trace.blocks[1].groups[0], minlength=12)[1:]
    assert torch.equal(counts.double(), size[0, 1:, 0]), "the merge's own sizes count the same patches"


def test_diffrate_groups_on_a_hand_built_4x4_grid():
    """Importance: the class query's logit to patch j is 16 - j (keys along the query), so the sorted order
    is patches 0..15. prune_kept 13 keeps class + patches 0..11 (12..15 dropped); merge_kept 9 keeps class
    + patches 0..7, and patches 8..11 go to their most similar kept patch by the hidden states: 8 and 9 to
    0, 10 to 3, 11 to 5."""
    N, d = 17, 4
    q = torch.zeros(1, 1, N, d, dtype=torch.float64)
    q[0, 0, 0, 0] = 1.0
    k = torch.zeros(1, 1, N, d, dtype=torch.float64)
    k[0, 0, 1:, 0] = torch.arange(16, 0, -1, dtype=torch.float64)
    e = torch.eye(32, dtype=torch.float64)
    # token t = patch t - 1 is e_t, but patches 8 and 9 lean to patch 0 (e_1), 10 to 3 (e_4), 11 to 5 (e_6)
    x = one_hot(N, 32, {9: e[1] + 0.1 * e[20], 10: e[1] + 0.2 * e[21], 11: e[4] + 0.3 * e[22], 12: e[6]})
    trace = SourceTrace(num_prefix=1)
    trace.start(x)
    out, _ = step(trace, DiffRateReducer(prune_kept=13, merge_kept=9, num_protected=1), x, None, q, k)
    assert out.shape[1] == 9 and trace.blocks[0].tokens == 9
    assert groups_of(trace.blocks[0]) == {frozenset({0, 8, 9}), frozenset({3, 10}), frozenset({5, 11})} | {
        frozenset({p}) for p in (1, 2, 4, 6, 7)}
    assert (trace.blocks[0].groups[0, 12:] == -1).all() and (trace.blocks[0].groups[0, :12] >= 0).all()
    assert not trace.blocks[0].fused.any()
    assert_partition(trace)


class _FixedScores(nn.Module):
    """A stand-in selector: fixed keep log-probabilities per spatial token (B, n, 2)."""

    def __init__(self, keep_logp: torch.Tensor):
        super().__init__()
        self.keep_logp = keep_logp

    def forward(self, x, policy):
        lp = self.keep_logp[: x.shape[1]].to(x.dtype)
        return torch.stack([lp, torch.zeros_like(lp)], dim=-1).expand(x.shape[0], -1, -1)


def test_spvit_groups_on_a_hand_built_4x4_grid():
    """Selector 0 keeps the 6 best-scored patches (scores 15 - j: patches 0..5) and fuses 6..15 into a
    package token; selector 1 keeps 2 of those 6 (the scores are given by the position among the tokens it
    sees: positions 0 and 1, i.e. patches 0 and 1) and fuses 2..5 into a second package. Packages are
    never re-scored."""
    sel0 = SPViTSelector(dim=8, hidden=8, index=0, keep=6, num_prefix=1).eval()
    sel0.selector = _FixedScores(torch.arange(15, -1, -1, dtype=torch.float64))
    sel1 = SPViTSelector(dim=8, hidden=8, index=1, keep=2, num_prefix=1).eval()
    sel1.selector = _FixedScores(torch.arange(5, -1, -1, dtype=torch.float64))
    x = torch.randn(2, 17, 8, dtype=torch.float64)
    trace = SourceTrace(num_prefix=1)
    trace.start(x)
    x, size = step(trace, sel0, x, None, None, None)
    x, size = step(trace, sel1, x, size, None, None)
    b0, b1 = trace.blocks
    assert [b0.tokens, b1.tokens] == [8, 5]  # class + 6 + package; class + 2 + 2 packages
    assert groups_of(b0) == {frozenset(range(6, 16))} | {frozenset({p}) for p in range(6)}
    assert b0.groups[0, 6:].tolist() == [7] * 10 and b0.fused[0].tolist() == [False] * 6 + [True] * 10
    assert groups_of(b1) == {frozenset(range(6, 16)), frozenset({2, 3, 4, 5}), frozenset({0}), frozenset({1})}
    assert b1.groups[0].tolist() == [1, 2, 4, 4, 4, 4] + [3] * 10  # class, kept 0/1, old package, new package
    assert b1.fused[0].tolist() == [False, False] + [True] * 14
    assert_partition(trace)
    counts = torch.bincount(b1.groups[0], minlength=5)[1:]
    assert torch.equal(counts.double(), size[0, 1:, 0]), "package sizes count the folded patches"


# ---------------------------------------------------------------------------------------------------------
# on whole (tiny) models
# ---------------------------------------------------------------------------------------------------------
CASES = [("tome", "low"), ("pyra", "low"), ("diffrate", "flops:0.8"), ("spvit", "flops:0.7"), ("rap", "low"),
         ("peft", "none")]


@pytest.fixture(scope="module")
def models():
    """The inference model of each method on the tiny test ViT (structure fixed by entering the stages
    without data), PYRA with random, non-zero modulation weights."""
    import warnings

    out = {}
    for method, comp in CASES:
        torch.manual_seed(0)
        model = build_model("vit_tiny_test", 10, method, comp, drop_path_rate=0.0)
        m = model.pyra_method
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for st in m.stages():
                m.on_stage_start(st, model, None)
        infer = m.inference_model(model).eval()
        if method == "pyra":
            with torch.no_grad():
                for p in infer.parameters():
                    if p.dim() and p.shape[0] == 1:  # W_D (1, D): zero at init
                        p.normal_(std=0.5)
        out[method] = infer
    return out


def _x(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1], generator=g)


@pytest.mark.parametrize("method", [c[0] for c in CASES])
def test_traced_forward_gives_identical_logits_and_a_partition(models, method):
    model = models[method]
    x = _x(model)
    sizes = []
    hooks = [blk.register_forward_hook(lambda m, a, o: sizes.append(o[1])) for blk in model.blocks]
    with torch.no_grad():
        before = model(x)
        sizes.clear()
        with trace_sources(model) as trace:
            traced = model(x)
        for h in hooks:
            h.remove()
        after = model(x)
    assert torch.equal(before, traced) and torch.equal(before, after)
    assert len(trace.blocks) == len(model.blocks)
    assert_partition(trace)
    assert [b.tokens for b in trace.blocks] == [s.shape[1] if s is not None else 17 for s in sizes]
    for blk, size in zip(trace.blocks, sizes):
        held = torch.stack([torch.bincount(g[g >= 0], minlength=blk.tokens) for g in blk.groups])
        assert (held[:, 1:] >= (0 if method == "spvit" else 1)).all(), "no token (but an empty package) holds nothing"
        if size is not None and method != "diffrate":  # DiffRate's sizes are similarity-scaled, not counts
            assert torch.equal(held[:, 1:].float(), size[:, 1:, 0].round()), "sizes count the held patches"
    if method in ("rap", "peft"):
        assert all(torch.equal(b.groups, trace.blocks[0].groups) for b in trace.blocks)
        assert (trace.blocks[-1].groups == torch.arange(1, 17)).all(), "every patch keeps its own token"
    if method == "spvit":
        assert trace.blocks[-1].fused.any()
    # nothing of the trace stays behind
    assert all(not blk._forward_hooks and not blk._forward_pre_hooks for blk in model.blocks)
    assert all(blk.token_reducer is None or blk.token_reducer.trace is None for blk in model.blocks)


def test_pyra_modulation_strength_follows_the_paper(models):
    """In each merging block the patches of the r merged sources carry the mean over channels of
    (2 sigmoid(M_info W_D^T) - 1) * 2 sigmoid(W_r^T M_info) (eqs. 4-7, float64 from the block's own
    inputs), every other patch NaN."""
    import copy

    model = copy.deepcopy(models["pyra"]).double()
    x = _x(model).double()
    inputs = []
    hooks = [blk.token_reducer.register_forward_pre_hook(lambda m, a: inputs.append(a))
             for blk in model.blocks if blk.token_reducer is not None]
    try:
        with torch.no_grad(), trace_sources(model) as trace:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    merging = [i for i, blk in enumerate(model.blocks) if blk.token_reducer is not None]
    prev = torch.arange(1, 17).expand(3, 16)
    for i, (xb, size, _, k) in zip(merging, inputs):
        red = model.blocks[i].token_reducer
        mod, B, N, D = red.modulator, *xb.shape
        m = bipartite_matching(k.mean(1), red.r)
        s_all = torch.ones(B, N, 1, dtype=xb.dtype) if size is None else size
        s = xb[:, ::2].gather(1, m.src_idx.expand(-1, -1, D)) * s_all[:, ::2].gather(1, m.src_idx)
        t = (xb[:, 1::2] * s_all[:, 1::2]).gather(1, m.dst_idx.expand(-1, -1, D))
        info = nn.functional.layer_norm(s + t, (D,), mod.norm.weight, mod.norm.bias, mod.norm.eps)
        want = (2 * torch.sigmoid(info @ mod.w_d.t()) - 1)[..., 0] * (
            2 * torch.sigmoid((info * mod.w_r).sum(1, keepdim=True))).mean(-1)
        got = trace.blocks[i].modulation
        src_tokens = 2 * m.src_idx[..., 0]  # A token a is token 2a
        for b in range(B):
            for j in range(red.r):
                patches = (prev[b] == src_tokens[b, j]).nonzero()[:, 0]
                assert len(patches) and torch.allclose(got[b, patches].double(), want[b, j].expand(len(patches)))
        assert int((~got.isnan()).sum()) == int(sum((prev[b][:, None] == src_tokens[b][None]).sum() for b in range(B)))
        assert want.abs().max() > 1e-3, "the check is not vacuous (non-zero modulation)"
        prev = trace.blocks[i].groups
    assert all(trace.blocks[i].modulation is None for i in range(len(model.blocks)) if i not in merging)


@pytest.mark.parametrize("variant", MODULATORS.names())
def test_every_modulator_gate_is_its_forward(variant):
    """``forward(s, t) = s + gate(s, t) * s`` (what the traced strength averages), with non-zero weights."""
    torch.manual_seed(0)
    mod = build_modulator(variant, 5, 12).double()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_()
    s, t = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(s + mod.gate(s, t) * s, mod(s, t), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# off means off: no extra work
# ---------------------------------------------------------------------------------------------------------
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops(fn) -> list[str]:
    with torch.no_grad(), _Ops() as rec:
        fn()
    return rec.ops


class _PlainToMe(TokenReducer):
    """ToMe's block step written from the public pure functions (the untraced reference)."""

    def __init__(self, r, modulator=None):
        super().__init__()
        self.r, self.modulator = r, modulator

    def forward(self, x, size, q, k):
        return merge_wavg(x, size, bipartite_matching(k.mean(dim=1), self.r), self.modulator)


class _PlainDiffRate(TokenReducer):
    def __init__(self, red):
        super().__init__()
        self.red = red

    def forward(self, x, size, q, k):
        from pyra_bench.methods.diffrate import class_attention

        n, m = min(x.shape[1], self.red.prune_kept), min(x.shape[1], self.red.prune_kept, self.red.merge_kept)
        if m == x.shape[1]:
            return x, size
        size = x.new_ones(*x.shape[:2], 1) if size is None else size
        x, size = sort_by_importance(x, size, class_attention(q, k, size), self.red.num_protected)
        x, size = x[:, :n], size[:, :n]
        return merge_into_kept(x, size, m, self.red.num_protected) if m < n else (x, size)


@pytest.mark.parametrize("method", ["tome", "pyra", "diffrate"])
def test_untraced_forward_runs_exactly_the_reference_ops(models, method):
    """With tracing off (before and after a traced forward) the model dispatches the same tensor operations
    as the same model with its reducers replaced by the plain, trace-free block steps."""
    model, x = models[method], _x(models[method])
    reducers = [blk.token_reducer for blk in model.blocks]
    plain = [None if r is None else _PlainDiffRate(r) if isinstance(r, DiffRateReducer) else
             _PlainToMe(r.r, r.modulator) for r in reducers]
    untraced = _ops(lambda: model(x))
    with trace_sources(model):
        traced = _ops(lambda: model(x))
    again = _ops(lambda: model(x))
    for blk, p in zip(model.blocks, plain):
        blk.token_reducer = p
    try:
        reference = _ops(lambda: model(x))
    finally:
        for blk, r in zip(model.blocks, reducers):
            blk.token_reducer = r
    assert untraced == reference and again == reference
    assert len(traced) > len(reference), "the check would see tracing work"


@pytest.mark.parametrize("method", [c[0] for c in CASES])
def test_untraced_forward_never_reaches_trace_code(models, method, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("trace code ran with tracing off")

    for name in ("start", "move", "modulate", "end_block"):
        monkeypatch.setattr(SourceTrace, name, boom)
    for cls in (ToMeMerge, DiffRateReducer, SPViTSelector):
        monkeypatch.setattr(cls, "_trace", boom)
    with torch.no_grad():
        models[method](_x(models[method]))
