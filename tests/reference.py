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


def tome_merge_one(x, size, keys, r, class_token=True, distill_token=False, modulate=None):
    """ToMe merge of one image. x: (N, D), size: (N,), keys: (H, N, hd) tensors -> (x_out, size_out)."""
    N, D = x.shape
    x = x.double().tolist()
    size = size.double().tolist()
    metric = keys.double().mean(0).tolist()
    metric = [[a / math.sqrt(sum(b * b for b in row)) for a in row] for row in metric]
    A, B = list(range(0, N, 2)), list(range(1, N, 2))
    best = []
    for ia, a in enumerate(A):
        sims = [sum(p * q for p, q in zip(metric[a], metric[b])) for b in B]
        if distill_token:
            sims[0] = -math.inf
        j = max(range(len(B)), key=lambda jj: sims[jj])
        score = -math.inf if (class_token and ia == 0) else sims[j]
        best.append((score, j))
    order = sorted(range(len(A)), key=lambda i: -best[i][0])
    src, unm = order[:r], sorted(order[r:])
    xs = [[v * size[i] for v in x[i]] for i in range(N)]
    S = [xs[A[i]] for i in src]
    T = [xs[B[best[i][1]]] for i in src]
    if modulate is not None:
        S = modulate(S, T)
    dst = [list(xs[b]) for b in B]
    dsize = [size[b] for b in B]
    for k, i in enumerate(src):
        j = best[i][1]
        dst[j] = [p + q for p, q in zip(dst[j], S[k])]
        dsize[j] += size[A[i]]
    out = [xs[A[i]] for i in unm]
    osize = [size[A[i]] for i in unm]
    if distill_token:
        out = out[:1] + dst[:1] + out[1:] + dst[1:]
        osize = osize[:1] + dsize[:1] + osize[1:] + dsize[1:]
    else:
        out, osize = out + dst, osize + dsize
    xo = torch.tensor([[v / s for v in row] for row, s in zip(out, osize)], dtype=torch.float64)
    return xo, torch.tensor(osize, dtype=torch.float64)


def tokens_leaving_blocks(model, x):
    """Tokens leaving each block of a patched ViT (after its reducer), read from forward hooks."""
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts
