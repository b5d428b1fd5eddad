"""Measurement instruments: multiply-accumulates (two maintained counters + the analytic count),
inference throughput (the authors' protocol) and parameters, for the *deployable* model.

What is measured
    Always the inference model: ``model.pyra_method.inference_model(model)``, i.e. a copy with LoRA folded
    into the qkv weights (no extra FLOPs, no extra kernels). The other ``peft`` choices (adapter, vpt,
    prefix) do not fold: they stay in the inference model, and their cost is in every count and timing. :func:`measure_model` does that for you; the
    lower-level functions measure whatever model they are given and record whether it still carries an
    unmerged LoRA branch (``lora_merged``).

FLOPs (:func:`count_flops`)
    Unit: multiply-accumulates (MACs) of ONE image. The primary counter is fvcore's ``FlopCountAnalysis``
    (the authors' counter; it counts one fused multiply-add as one "flop" and traces with ``torch.jit``,
    which records the concrete, reduced token counts of the traced input). fvcore has no handle for
    ``aten::scaled_dot_product_attention`` (our attention kernel), so one is registered here:
    ``q @ k^T`` and ``attn @ v`` are ``B*H*Nq*Nk*(d_qk + d_v)`` MACs (``2*B*H*N^2*d`` for self-attention).
    Cross-checks: ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per MAC, so divided by 2; the CPU
    SDPA kernel ``_scaled_dot_product_flash_attention_for_cpu`` is not in its registry, pytorch#195460, so
    it is added here through ``custom_mapping``), and the analytic count of
    :func:`pyra_bench.models.macs.model_macs` (matmuls only). fvcore additionally counts LayerNorm
    (5 per element) and the tiny matching/modulation matmuls, so the counters differ by ~0.1 %.

    ``paper_gflops`` = fvcore total / 2**30, the number the paper prints as "FLOPs". The authors ran timm
    0.5.4, whose attention is written as two ``matmul`` ops, so their fvcore count *did* include attention
    (ViT-B/16: 17.582e9 / 2**30 = 16.37, Table 1). Their ToMe/PYRA rows (8.21 G low, 4.75 G high) were
    counted on the training model with the LoRA branch *unmerged* (+ N_l * (D*r + r*3D) MACs per block);
    :func:`measure_model` reports that as ``paper_gflops_lora_unmerged`` next to the deployable count.

Throughput (:func:`measure_throughput`)
    The authors' protocol (``engine.py: test_model_latency``): eval mode, no autograd
    (``torch.inference_mode``), one random input allocated once on the device, ``cudnn.benchmark=True``,
    a wall-clock warm-up, then whole forward passes, each followed by a device synchronisation, until the
    timed window is filled; images/s = batch * iterations / timed seconds. Mixed precision via autocast.
    ``compile=True`` measures the model after ``torch.compile`` (:func:`compile_model`; the compilation is
    done, and timed apart, before the warm-up).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import re
import statistics
import time
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

MEASURED_MODEL = "inference model (LoRA merged into qkv)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "32": "float32", "bf16": "bfloat16", "fp16": "float16", "16": "float16",
                  "half": "float16", "amp": "float16", "amp_fp16": "float16", "amp_bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the duration, then restore every module's training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def _param(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def input_spec(model: nn.Module, image_size: int | None = None) -> tuple[int, int]:
    """(in_chans, image_size) of a timm ViT-like model; ``image_size`` overrides the model's own."""
    pe = getattr(model, "patch_embed", None)
    in_chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
    if image_size is None:
        size = getattr(pe, "img_size", None)
        image_size = int(size[0] if isinstance(size, (tuple, list)) else size) if size is not None else 224
    return int(in_chans), int(image_size)


def lora_merged(model: nn.Module) -> bool:
    """True when no module of ``model`` still runs an unmerged LoRA branch."""
    from .models.lora import LoRALinear

    return not any(isinstance(m, LoRALinear) and not m.merged for m in model.modules())


def normalize_dtype(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for k, v in DTYPES.items():
            if v == dtype:
                return k
        raise ValueError(f"unsupported dtype {dtype}; valid: {', '.join(DTYPES)}")
    d = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if d not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; valid: {', '.join(DTYPES)} (or bf16/fp16/fp32)")
    return d


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str | torch.device = "cpu") -> str:
    """Human-readable name of the device: the CUDA device name, or the CPU model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{cpu_name()} ({n} thread{'' if n == 1 else 's'})"


def slugify(text: str) -> str:
    """File-name-safe slug: ``'NVIDIA GeForce RTX 3090'`` -> ``'nvidia-geforce-rtx-3090'``."""
    text = re.sub(r"\(r\)|\(tm\)|\bcpu @.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "device"


def device_slug(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return slugify(f"cpu {cpu_name()} {torch.get_num_threads()}t")


def software_versions() -> dict[str, str]:
    import timm

    v = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        from importlib.metadata import version

        import fvcore  # noqa: F401

        v["fvcore"] = version("fvcore")
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda or ""
        v["cudnn"] = str(torch.backends.cudnn.version())
    return v


# ---------------------------------------------------------------------------------------------------------
# token counts per block
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def record_tokens(model: nn.Module):
    """Record, on the next forward, the tokens entering each block (its attention) and the tokens its MLP
    sees (after the block's reduction). Yields a dict filled in place: ``attn``, ``mlp`` (lists)."""
    rec: dict[str, list[int]] = {"attn": [], "mlp": []}
    blocks = list(getattr(model, "blocks", []))
    handles = []

    def ntok(t: Any) -> int | None:
        if isinstance(t, (tuple, list)):
            t = t[0]
        return int(t.shape[1]) if isinstance(t, torch.Tensor) and t.dim() >= 2 else None

    for blk in blocks:
        handles.append(blk.register_forward_pre_hook(lambda m, args: rec["attn"].append(ntok(args))))
        if isinstance(getattr(blk, "mlp", None), nn.Module):
            handles.append(blk.mlp.register_forward_pre_hook(lambda m, args: rec["mlp"].append(ntok(args))))
        else:
            handles.append(blk.register_forward_hook(lambda m, args, out: rec["mlp"].append(ntok(out))))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------
# FLOP counters
# ---------------------------------------------------------------------------------------------------------
SDPA_OP = "aten::scaled_dot_product_attention"


def sdpa_macs(q_shape, k_shape, v_shape) -> int:
    """MACs of ``softmax(q k^T) v``: ``q@k^T`` (prod(batch)*Nq*Nk*d) + ``attn@v`` (prod(batch)*Nq*Nk*dv).

    Self-attention with B images, H heads, N tokens, head dim d: ``2*B*H*N*N*d``. Softmax, scaling and the
    additive (proportional-attention) bias are not counted, as fvcore does not count elementwise ops.
    """
    *batch, nq, d = q_shape
    nk, dv = k_shape[-2], v_shape[-1]
    return int(math.prod(batch)) * int(nq) * int(nk) * (int(d) + int(dv))


def _fvcore_sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    return sdpa_macs(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(inputs[2]))


def fvcore_count(model: nn.Module, x: torch.Tensor, count_attention: bool = True) -> dict[str, Any]:
    """fvcore MACs of ``model(x)`` (whole batch): ``{"total", "by_operator", "unsupported_ops"}``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # fvcore's import and jit tracing warn (torch.jit deprecation, tracer)
        from fvcore.nn import FlopCountAnalysis

        fa = FlopCountAnalysis(model, x)
        if count_attention:
            fa.set_op_handle(SDPA_OP, _fvcore_sdpa_handle)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        fa.tracer_warnings("none")
        total = int(fa.total())
        by_op = {k: int(v) for k, v in fa.by_operator().items()}
        unsupported = dict(fa.unsupported_ops())
    return {"total": total, "by_operator": by_op, "unsupported_ops": unsupported}


def _flop_counter_custom_mapping() -> dict[Any, Any]:
    """SDPA kernels that ``FlopCounterMode`` does not know (the CPU one, pytorch#195460): 2 FLOPs per MAC."""
    from torch.utils.flop_counter import flop_registry

    def sdpa_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * sdpa_macs(q_shape, k_shape, v_shape)

    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry:
            mapping[op] = sdpa_flop
    return mapping


def flop_counter_count(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """``torch.utils.flop_counter.FlopCounterMode`` on ``model(x)`` (whole batch), converted to MACs."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_flop_counter_custom_mapping()) as fc:
        model(x)
    by_op: Counter = Counter()
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        by_op[str(getattr(op, "__name__", op)).split(".")[0]] += int(n) // 2
    return {"total": int(fc.get_total_flops()) // 2, "by_operator": dict(by_op)}


def count_flops(model: nn.Module, image_size: int | None = 224, batch: int = 1,
                cross_check: bool = True) -> dict[str, Any]:
    """MACs of ONE image through ``model`` (measure the LoRA-merged inference model).

    Returns the ``flops`` sub-dict of a run record::

        gmacs                   fvcore total incl. attention, 1e9 MACs per image (the headline number)
        paper_gflops            fvcore total / 2**30 (the paper's "FLOPs" unit, Table 1)
        gmacs_attention         the attention matmuls (q@k^T, attn@v) alone
        gmacs_fvcore_no_attention  what plain fvcore reports on SDPA attention (attention silently missing)
        gmacs_flop_counter      torch.utils.flop_counter / 2 (with the CPU SDPA kernel registered)
        gmacs_analytic          pyra_bench.models.macs.model_macs (matmuls only)
        disagreement            relative difference of each cross-check to ``gmacs``
        tokens_per_block        tokens entering each block (its attention)
        tokens_mlp_per_block    tokens in each block's MLP (after the block's reduction)
        tokens_final            tokens leaving the last block
        counter, lora_merged, by_operator, unsupported_ops, image_size, note

    Token counts are data dependent in general; they are those of the random input used here (for the
    fixed-r merging schedules they are exact and input independent). If fvcore cannot trace a model, the
    FlopCounterMode count becomes the headline (``counter`` says which).
    """
    in_chans, image_size = input_spec(model, image_size)
    p = _param(model)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.dtype.is_floating_point else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, in_chans, image_size, image_size, generator=gen).to(dev, dtype)
    out: dict[str, Any] = {"image_size": image_size, "lora_merged": lora_merged(model)}
    with _eval_mode(model):
        with torch.no_grad(), record_tokens(model) as tok:
            model(x)
        fv = fc = None
        errors = {}
        try:
            fv = fvcore_count(model, x, count_attention=True)
        except Exception as e:  # noqa: BLE001 - fall back to the other counter, say so
            errors["fvcore"] = f"{type(e).__name__}: {e}"
        if cross_check or fv is None:
            try:
                fc = flop_counter_count(model, x)
            except Exception as e:  # noqa: BLE001
                errors["flop_counter"] = f"{type(e).__name__}: {e}"
    analytic = None
    if cross_check or (fv is None and fc is None):
        try:
            from .models.macs import model_macs

            analytic = model_macs(model, include_head=True)
        except Exception as e:  # noqa: BLE001 - the analytic count only knows ViT structures
            errors["analytic"] = f"{type(e).__name__}: {e}"

    if fv is not None:
        total, counter = fv["total"] / batch, "fvcore (+ SDPA handle)"
        attn = fv["by_operator"].get(SDPA_OP.split("::")[1], 0) / batch
        out["by_operator"] = {k: v / batch / 1e9 for k, v in sorted(fv["by_operator"].items(), key=lambda kv: -kv[1])}
        out["unsupported_ops"] = fv["unsupported_ops"]
    elif fc is not None:
        total, counter = fc["total"] / batch, "torch.utils.flop_counter / 2"
        attn = sum(v for k, v in fc["by_operator"].items() if "attention" in k) / batch
        out["by_operator"] = {k: v / batch / 1e9 for k, v in fc["by_operator"].items()}
    elif analytic is not None:
        total, counter, attn = float(analytic), "analytic (models/macs.py)", None
    else:
        raise RuntimeError(f"no FLOP counter could measure this model: {errors}")

    out.update({
        "gmacs": total / 1e9,
        "paper_gflops": total / 2**30,
        "counter": counter,
        "gmacs_attention": attn / 1e9 if attn is not None else None,
        "gmacs_fvcore_no_attention": (total - attn) / 1e9 if fv is not None else None,
        "gmacs_flop_counter": fc["total"] / batch / 1e9 if fc is not None else None,
        "gmacs_analytic": analytic / 1e9 if analytic is not None else None,
    })
    dis = {}
    for k in ("gmacs_flop_counter", "gmacs_analytic"):
        if out[k] is not None and out["gmacs"] > 0:
            dis[k.replace("gmacs_", "")] = (out[k] - out["gmacs"]) / out["gmacs"]
    out["disagreement"] = dis
    out["max_disagreement"] = max((abs(v) for v in dis.values()), default=None)
    out["tokens_per_block"] = tok["attn"]
    out["tokens_mlp_per_block"] = tok["mlp"]
    out["tokens_final"] = tok["mlp"][-1] if tok["mlp"] else None
    if errors:
        out["errors"] = errors
    out["note"] = ("MACs per image of the measured model (one multiply-add = 1; fvcore convention); attention "
                   "q@k^T and attn@v counted explicitly (fvcore has no SDPA handle); paper_gflops = fvcore / 2**30")
    return out


def paper_gflops_of(model: nn.Module, image_size: int | None = None) -> float:
    """fvcore total / 2**30 of ``model`` as given (e.g. the training model with LoRA unmerged)."""
    in_chans, image_size = input_spec(model, image_size)
    p = _param(model)
    x = torch.rand(1, in_chans, image_size, image_size).to(p.device if p is not None else "cpu")
    with _eval_mode(model):
        return fvcore_count(model, x)["total"] / 2**30


# ---------------------------------------------------------------------------------------------------------
# throughput
# ---------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
                  "cudnn": "CUDNN_ATTENTION"}


def sdpa_backend_context(name: str | None):
    if name in (None, "", "auto"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in _SDPA_BACKENDS:
        raise ValueError(f"unknown sdpa_backend {name!r}; valid: auto, {', '.join(_SDPA_BACKENDS)}")
    return sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[name])])


def _device_and_dtype(device: str | torch.device, dtype: str | torch.dtype) -> tuple[torch.device, str]:
    """Checked device and dtype name for the timing functions."""
    device, dtype = torch.device(device), normalize_dtype(dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but CUDA is not available")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("float16 autocast is for CUDA; use dtype=bfloat16 (or float32) on the CPU")
    return device, dtype


def compile_model(model: nn.Module, compile: bool | str = True) -> nn.Module:
    """``torch.compile`` of ``model`` for fixed shapes (``dynamic=False``: merging schedules are static, so
    every token count is). ``compile``: True (inductor) or a backend name (e.g. ``aot_eager``); False -> as is."""
    if not compile:
        return model
    backend = "inductor" if compile is True else str(compile)
    return torch.compile(model, backend=backend, dynamic=False)


def _compiled_call(fn, device: torch.device) -> float:
    """Run ``fn`` once (this compiles it) and return the seconds it took."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def default_batch_size(device: str | torch.device) -> int:
    """Timing batch when none is given: 512 on CUDA (the authors' protocol), 8 on the CPU."""
    return 512 if torch.device(device).type == "cuda" else 8


def _time_calls(fn, device: torch.device, warmup_s: float, duration_s: float, min_warmup_iters: int = 1,
                min_iters: int = 2) -> tuple[list[float], int, float]:
    """Call ``fn`` (one whole forward or training step) until ``warmup_s`` has passed (at least
    ``min_warmup_iters`` calls), then time calls, each between device synchronisations, until ``duration_s``
    seconds have been summed (at least ``min_iters``). Returns (call times, warm-up calls, warm-up seconds)."""
    _sync(device)
    t0, warm_iters = time.perf_counter(), 0
    while warm_iters < min_warmup_iters or time.perf_counter() - t0 < warmup_s:
        fn()
        _sync(device)
        warm_iters += 1
    warm_elapsed = time.perf_counter() - t0
    times: list[float] = []
    total = 0.0
    while len(times) < min_iters or total < duration_s:
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t
        times.append(dt)
        total += dt
    return times, warm_iters, warm_elapsed


def _timed_sample(fn, repeats: int, device: torch.device, clock=None) -> float:
    """Seconds of ``repeats`` back-to-back calls of ``fn`` between device synchronisations (``clock``:
    default ``time.perf_counter``, wall time)."""
    clock = clock or time.perf_counter
    _sync(device)
    t = clock()
    for _ in range(repeats):
        fn()
    _sync(device)
    return clock() - t


def _balanced_repeats(warm: dict[str, float]) -> dict[str, int]:
    """Calls per sample that make every sample about as long as the slowest call (rounded, at least 1)."""
    slowest = max(warm.values())
    return {k: max(1, round(slowest / max(t, 1e-9))) for k, t in warm.items()}


def time_sandwiched(fns: dict[str, Any], reference: str, device: str | torch.device, duration_s: float,
                    min_rounds: int = 3, warmup_rounds: int = 1, balance: bool = True,
                    clock=None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved timing in which a sample of ``reference`` sits between every two samples of the others:
    ``ref, a, ref, b, ref, c, ref, ...`` (the order of the others rotated every round). Returns
    ``(times, flanks)``: each call's time per call, round by round (``times[reference]`` holds every
    reference sample), and for each other call the mean of the two reference samples around each of its
    samples. A ratio to the flanks compares two samples seconds apart, so the drift of a shared machine
    cancels on that scale rather than on the scale of a whole round; two calls compare through their
    per-round ratios to their own flanks.

    ``balance`` (needs a warm-up round): each timed sample of a call runs it ``k`` times back to back, ``k``
    the slowest call's warm-up time over this one's (rounded, at least 1), and records the time per call.
    Every sample then spans about the same wall time, so a stall of the machine costs every call the same
    share of its sample instead of costing a fast call a larger share than a slow one -- which biases
    ratios against the fast call.

    ``clock`` (default ``time.perf_counter``) measures the samples, e.g. ``time.process_time`` for the CPU
    time of a single-threaded call, which a shared machine's other jobs inflate far less than wall time."""
    device = torch.device(device)
    if reference not in fns:
        raise ValueError(f"reference {reference!r} is not one of the calls: {sorted(fns)}")
    if balance and warmup_rounds < 1:
        raise ValueError("balance=True needs at least one warm-up round (it sizes the samples)")
    others = [k for k in fns if k != reference]
    times: dict[str, list[float]] = {k: [] for k in fns}
    flanks: dict[str, list[float]] = {k: [] for k in others}
    warm = {k: _timed_sample(fns[k], 1, device, clock) for r in range(warmup_rounds) for k in fns}
    repeats = _balanced_repeats(warm) if balance else {k: 1 for k in fns}

    def ref_sample() -> float:
        t = _timed_sample(fns[reference], repeats[reference], device, clock) / repeats[reference]
        times[reference].append(t)
        return t

    before, total, rnd = ref_sample(), 0.0, 0
    while rnd < min_rounds or total < duration_s:
        for j in range(len(others)):
            k = others[(j + rnd) % len(others)]
            dt = _timed_sample(fns[k], repeats[k], device, clock)
            times[k].append(dt / repeats[k])
            after = ref_sample()
            flanks[k].append((before + after) / 2)
            total += dt + after * repeats[reference]
            before = after
        rnd += 1
    return times, flanks


def measure_throughput(
    model: nn.Module,
    batch_size: int = 512,
    image_size: int | None = 224,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    warmup_s: float = 10.0,
    duration_s: float = 10.0,
    channels_last: bool = False,
    min_warmup_iters: int = 1,
    min_iters: int = 2,
    cudnn_benchmark: bool = True,
    num_threads: int | None = None,
    sdpa_backend: str | None = None,
    compile: bool | str = False,
) -> dict[str, Any]:
    """Inference images/s of ``model`` with the authors' protocol (see the module docstring).

    ``model`` is moved to ``device`` in place (pass the inference model, a copy) and run in eval mode (its
    training flags are restored afterwards). ``dtype``: ``float32``
    (the paper), ``bfloat16`` or ``float16`` via autocast (weights stay float32; float16 needs CUDA).
    Warm-up runs whole forwards until ``warmup_s`` has passed (at least ``min_warmup_iters``); the timed
    window runs whole forwards, each followed by a device synchronisation, until ``duration_s`` seconds
    have been summed (at least ``min_iters``). ``img_per_s = batch_size * iters / timed seconds``; the
    median-based figure and the spread of the iteration times are recorded too.

    ``sdpa_backend`` (``flash`` | ``efficient`` | ``math`` | ``cudnn``; None = PyTorch's choice) pins the
    attention kernel, so that merged models (additive ``log(size)`` bias) and the unmerged model (no mask)
    can be compared on the same kernel (spec section 7): on CUDA, FlashAttention takes no additive mask,
    so by default the unmerged model runs Flash and the merged ones the memory-efficient kernel.
    ``compile``: measure ``torch.compile(model)`` (:func:`compile_model`); ``compile_s`` records the first
    call, which compiles.
    """
    device, dtype = _device_and_dtype(device, dtype)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    backend_ctx = sdpa_backend_context(sdpa_backend)
    prev_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    dev_name = device_name(device)
    prev_bench = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark  # as the authors (train.py sets it globally)
    in_chans, image_size = input_spec(model, image_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    merged = lora_merged(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, in_chans, image_size, image_size, device=device).contiguous(memory_format=fmt)
    amp = dtype != "float32"
    autocast = (torch.autocast(device_type=device.type, dtype=DTYPES[dtype]) if amp else contextlib.nullcontext())
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with _eval_mode(model), torch.inference_mode(), autocast, backend_ctx:
            net = compile_model(model, compile)
            compile_s = _compiled_call(lambda: net(x), device) if compile else None
            times, warm_iters, warm_elapsed = _time_calls(lambda: net(x), device, warmup_s, duration_s,
                                                          min_warmup_iters, min_iters)
        total = sum(times)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    finally:
        torch.backends.cudnn.benchmark = prev_bench
        if num_threads:
            torch.set_num_threads(prev_threads)
    med = statistics.median(times)
    return {
        "img_per_s": batch_size * len(times) / total,
        "img_per_s_median": batch_size / med,
        "iter_time_s": {"mean": total / len(times), "median": med, "min": min(times), "max": max(times),
                        "std": statistics.pstdev(times)},
        "iters": len(times),
        "timed_s": total,
        "warmup_iters": warm_iters,
        "warmup_s": warm_elapsed,
        "batch_size": batch_size,
        "image_size": image_size,
        "device": dev_name,
        "device_type": device.type,
        "dtype": dtype,
        "autocast": amp,
        "channels_last": channels_last,
        "threads": torch.get_num_threads() if not num_threads else int(num_threads),
        "cudnn_benchmark": cudnn_benchmark if device.type == "cuda" else None,
        "peak_memory_gib": peak_mem,
        "sdpa_backend": sdpa_backend or "auto",
        "compiled": ("inductor" if compile is True else str(compile)) if compile else None,
        "compile_s": compile_s,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "lora_merged": merged,
        "measured": MEASURED_MODEL if merged else "model with an UNMERGED LoRA branch",
        "protocol": "eval, inference_mode, random input, wall-clock warm-up, whole forwards with device sync; "
                    "img/s = batch * iters / timed seconds",
        "versions": software_versions(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
    }


def measure_training_step(
    model: nn.Module,
    batch_size: int = 64,
    image_size: int | None = 224,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    warmup_s: float = 5.0,
    duration_s: float = 10.0,
    min_iters: int = 2,
    lr: float = 1e-3,
    compile: bool | str = False,
) -> dict[str, Any]:
    """Training images/s of a built (trainable) model: whole steps of forward, cross-entropy, backward and
    an AdamW step over the parameters that require gradients (the frozen backbone gets none), in train
    mode, on one random batch allocated once, each step followed by a device synchronisation. Data loading
    is excluded (see the run records' ``training_cost`` for the figure with it). ``model`` itself is left
    untouched: a copy is trained. ``dtype``: autocast as in :func:`measure_throughput`; ``compile``: train
    ``torch.compile(copy)`` (:func:`compile_model`; the first, compiling, step is timed apart as ``compile_s``)."""
    device, dtype = _device_and_dtype(device, dtype)
    net = copy.deepcopy(model).to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr)
    in_chans, image_size = input_spec(net, image_size)
    num_classes = getattr(net, "num_classes", None) or 10
    x = torch.randn(batch_size, in_chans, image_size, image_size, device=device)
    y = torch.randint(0, int(num_classes), (batch_size,), device=device)
    amp = dtype != "float32"
    autocast = (torch.autocast(device_type=device.type, dtype=DTYPES[dtype]) if amp else contextlib.nullcontext())
    fwd = compile_model(net, compile)

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    compile_s = _compiled_call(step, device) if compile else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, warm_iters, _ = _time_calls(step, device, warmup_s, duration_s, 1, min_iters)
    total, med = sum(times), statistics.median(times)
    return {
        "img_per_s": batch_size * len(times) / total, "img_per_s_median": batch_size / med,
        "iters": len(times), "timed_s": total, "warmup_iters": warm_iters, "batch_size": batch_size,
        "image_size": image_size, "trainable_params": sum(p.numel() for p in params),
        "device": device_name(device), "dtype": dtype, "autocast": amp, "threads": torch.get_num_threads(),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "compiled": ("inductor" if compile is True else str(compile)) if compile else None, "compile_s": compile_s,
        "protocol": "train mode, random batch, forward + cross-entropy + backward + AdamW step, device sync "
                    "per step; data loading excluded",
        "versions": software_versions(),
    }


# ---------------------------------------------------------------------------------------------------------
# all of it for a built model
# ---------------------------------------------------------------------------------------------------------
def inference_model(model: nn.Module) -> nn.Module:
    """The deployable model of a built model (LoRA merged, a copy; adapters, VPT prompts and prefix keys/values
    do not fold and stay in it, so their cost is measured); a plain model is copied as is."""
    method = getattr(model, "pyra_method", None)
    if method is not None:
        return method.inference_model(model).eval()
    from .models.lora import merge_lora

    return merge_lora(model, inplace=False).eval()


def measure_model(
    model: nn.Module,
    image_size: int | None = None,
    *,
    params: bool = True,
    flops: bool = True,
    throughput: bool = False,
    throughput_kwargs: dict[str, Any] | None = None,
    paper_compat: bool = True,
) -> dict[str, Any]:
    """Parameters, MACs and (optionally) throughput of a model built by :func:`pyra_bench.models.build_model`.

    Returns the run-record sub-dicts ``{"params", "flops", "throughput", "measured"}``. Parameters are
    counted on the built (trainable) model; MACs and throughput on its inference model (LoRA merged). With
    ``paper_compat`` the flops dict also carries ``paper_gflops_lora_unmerged``: fvcore / 2**30 of the
    model as trained (LoRA branch unmerged), which is how the paper's token-merging rows were counted.
    The built model itself is not modified (throughput runs on the copy).
    """
    out: dict[str, Any] = {"measured": MEASURED_MODEL, "params": None, "flops": None, "throughput": None}
    if params:
        from .models.params import count_parameters

        out["params"] = count_parameters(model, getattr(model, "pyra_method", None)).as_dict()
    infer = inference_model(model)
    if flops:
        infer_cpu = copy.deepcopy(infer).cpu() if _param(infer) is not None and _param(infer).device.type != "cpu" else infer
        f = count_flops(infer_cpu, image_size)
        if paper_compat and not lora_merged(model):
            try:
                src = model if _param(model) is None or _param(model).device.type == "cpu" else copy.deepcopy(model).cpu()
                f["paper_gflops_lora_unmerged"] = paper_gflops_of(src, image_size)
            except Exception:  # noqa: BLE001 - informative extra
                f["paper_gflops_lora_unmerged"] = None
        out["flops"] = f
    if throughput:
        kw = {"image_size": image_size, **(throughput_kwargs or {})}
        out["throughput"] = measure_throughput(infer, **kw)
    return out
