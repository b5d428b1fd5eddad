"""Slow, independent float64 re-computations (Python loops, no code shared with pyra_bench)."""

import math

import torch


def layer_norm(v, weight, bias, eps):
    mu = sum(v) / len(v)
    var = sum((a - mu) ** 2 for a in v) / len(v)
    return [(a - mu) / math.sqrt(var + eps) * w + b for a, w, b in zip(v, weight, bias)]


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def pyra_modulate(S, T, w_r, w_d, ln_w, ln_b, eps):
    """Eqs. 4-7 of the paper for one image. S, T: lists of r vectors (lists of D floats)."""
    r, D = len(S), len(S[0])
    info = [layer_norm([S[k][c] + T[k][c] for c in range(D)], ln_w, ln_b, eps) for k in range(r)]
    delta_d = [sum(w_r[k] * info[k][c] for k in range(r)) for c in range(D)]  # one per channel
    delta_r = [sum(w_d[c] * info[k][c] for c in range(D)) for k in range(r)]  # one per pair
    return [[S[k][c] + (2 * sigmoid(delta_r[k]) - 1) * (2 * sigmoid(delta_d[c]) * S[k][c]) for c in range(D)]
            for k in range(r)]


def tome_merge(x, size, metric, r, num_protected=1, modulate=None):
    """ToMe's merge of one image written out: x (N, D), size (N,), metric (N, C) float64 tensors; the
    ``num_protected`` leading tokens (class, distillation, registers, prompts) never merge and stay first in
    their order; ``modulate(S, T)`` rewrites the size-weighted sources given their destinations (PYRA).
    -> (x_out, size_out)."""
    n, P = x.shape[0], num_protected
    A, B = list(range(0, n, 2)), list(range(1, n, 2))
    m = [row / math.sqrt(float(row @ row)) for row in metric]
    best = []
    for a in A:
        sims = [-math.inf if b < P else float(m[a] @ m[b]) for b in B]
        j = max(range(len(B)), key=lambda jj: sims[jj])
        best.append((-math.inf if a < P else sims[j], j))
    src = sorted(range(len(A)), key=lambda i: -best[i][0])[:r]  # stable, like a descending argsort without ties
    acc = {b: (x[b] * size[b], size[b]) for b in B}
    if src:
        S = torch.stack([x[A[i]] * size[A[i]] for i in src])
        T = torch.stack([x[B[best[i][1]]] * size[B[best[i][1]]] for i in src])
        for s, i in zip(S if modulate is None else modulate(S, T), src):
            b = B[best[i][1]]
            acc[b] = (acc[b][0] + s, acc[b][1] + size[A[i]])
    kept = sorted(set(range(len(A))) - set(src))
    toks = list(range(P)) + [A[i] for i in kept if A[i] >= P] + [b for b in B if b >= P]
    return (torch.stack([acc[t][0] / acc[t][1] if t in acc else x[t] for t in toks]),
            torch.stack([acc[t][1] if t in acc else size[t] for t in toks]))


def tome_merge_one(x, size, keys, r, class_token=True, distill_token=False, modulate=None):
    """ToMe merge of one image. x: (N, D), size: (N,), keys: (H, N, hd) tensors -> (x_out, size_out) in float64;
    ``modulate`` takes and returns lists of r vectors (lists of D floats), as :func:`pyra_modulate`."""
    mod = None if modulate is None else (
        lambda S, T: torch.tensor(modulate(S.tolist(), T.tolist()), dtype=torch.float64))
    return tome_merge(x.double(), size.double(), keys.double().mean(0), r, int(class_token) + int(distill_token),
                      mod)


def tokens_leaving_blocks(model, x):
    """Tokens leaving each block of a patched ViT (after its reducer), read from forward hooks."""
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts
