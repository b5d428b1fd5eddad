"""``python -m pyra_bench.bench``: parameters, MACs and inference throughput of one model.

Composed by Hydra from ``conf/bench.yaml`` (groups ``backbone`` and ``method`` of ``conf/``, plus
``compression`` and the ``bench.*`` settings; ``--help`` lists them). The model is built exactly as
``pyra_bench.train`` builds it (random init by default: MACs and throughput do not depend on the weight
values), then its inference model -- LoRA merged into qkv -- is measured with
:func:`pyra_bench.measure.measure_model`. A table is printed and a JSON record is written atomically to
``results/bench/<backbone>__<method>[+<peft>]__<compression>__<device-slug>.json``.

For the paper's speedup table over every method and both schedules, use ``scripts/bench_speedup.py``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import factory  # noqa: F401  (registers the config resolvers the method configs use)
from .cli import hydra_app
from .errors import InputError, exit_on_input_error
from .identity import (
    compression_str,
    git_state,
    method_key,
    method_options,
    peft_choice,
    peft_suffix,
    run_id,
    utc_now,
)
from .paths import CONF_DIR

log = logging.getLogger("pyra_bench.bench")


def build_for_bench(cfg: DictConfig):
    """The model ``train`` would build for this config, through :func:`pyra_bench.factory.make_model` (every
    backbone and method config ``train`` accepts; weights only if ``bench.load_weights``); speed targets are
    timed as the bench measures (``bench.device``, ``bench.batch_size``, ``bench.dtype``)."""
    pretrained, checkpoint = False, None
    if cfg.bench.get("load_weights", False):
        pretrained, checkpoint = factory.resolve_weights(cfg.backbone)
    b = cfg.bench
    return factory.make_model(cfg, int(cfg.num_classes), pretrained, checkpoint,
                              timing={"device": str(b.device), "batch_size": b.get("batch_size"),
                                      "dtype": str(b.get("dtype", "float32"))})


def _git_rev() -> str | None:
    g = git_state()
    return (g.get("rev", "") + ("+dirty" if g.get("dirty") else "")) or None


def output_path(cfg: DictConfig, schedule: str) -> Path:
    from .measure import device_slug

    if cfg.bench.get("output"):
        return Path(cfg.bench.output)
    method = cfg.method.name + peft_suffix(cfg.get("peft"))  # +adapter / +vpt / +prefix; nothing for LoRA
    name = f"{cfg.backbone.name}__{method}__{schedule}__{device_slug(cfg.bench.device)}.json"
    return Path(cfg.bench.output_dir) / name


def throughput_kwargs(b: DictConfig) -> dict[str, Any]:
    """The ``bench.*`` timing settings for :func:`pyra_bench.measure.measure_throughput`; a null batch size
    means 512 on CUDA (the authors' protocol) and 8 on the CPU."""
    from .measure import default_batch_size

    batch = b.get("batch_size") or default_batch_size(str(b.device))
    return dict(batch_size=int(batch), device=str(b.device), dtype=str(b.dtype), warmup_s=float(b.warmup_s),
                duration_s=float(b.duration_s), channels_last=bool(b.channels_last))


def bench_runs(cfg: DictConfig) -> list[dict[str, Any]]:
    """Measure the exported inference models of finished runs (``bench.run``: a run folder, its
    ``inference_model.safetensors``, or a glob of either), all on this device in one go -- the paper's protocol of
    one GPU for every method. With ``bench.update_record`` the throughput is written into each run's
    record (atomically) so that the tables and figures use it."""
    import glob

    import torch

    from .errors import InputFileNotFoundError
    from .export import load_inference_model
    from .measure import MEASURED_MODEL, device_slug, measure_model, software_versions
    from .records import atomic_write_json, read_record

    b = cfg.bench
    if b.get("threads"):
        torch.set_num_threads(int(b.threads))
    if cfg.get("method") is not None and cfg.method.get("_target_"):
        from .identity import method_class

        method_class(cfg.method)  # the user's own method config: its class is registered, so exports may name it
    paths = sorted(glob.glob(str(b.run))) if any(c in str(b.run) for c in "*?[") else [str(b.run)]
    if not paths:
        raise InputFileNotFoundError(f"bench.run={b.run}: no run folder matches")
    slug, out = device_slug(b.device), []
    for p in paths:
        t0 = time.time()
        model = load_inference_model(p)  # checks the file before any measuring
        rc = model.pyra_config
        rid = rc.get("run_id") or run_id(OmegaConf.create(rc))
        res = measure_model(
            model, int(rc["backbone"]["image_size"]), params=False, flops=bool(b.flops), throughput=bool(b.throughput),
            throughput_kwargs=throughput_kwargs(b))
        if res["throughput"] is not None:
            res["throughput"]["measured_by"] = f"pyra_bench.bench bench.run (exported model of {rid})"
        record = {
            "schema": 1, "kind": "bench", "run_id": f"bench__{rid}__{slug}", "of_run": rid,
            "backbone": rc["backbone"]["name"], "method": rc["method"]["name"],
            "method_key": method_key(rc["method"]), "method_options": method_options(rc["method"]),
            "schedule": compression_str(rc["compression"]), "measured": MEASURED_MODEL + ", exported by the run",
            "weights": "trained (exported inference model)", "params": None, "flops": res["flops"],
            "throughput": res["throughput"], "config": {"bench": OmegaConf.to_container(b, resolve=True)},
            "git_rev": _git_rev(), "created": utc_now(),
            "versions": software_versions(), "wall_time_s": round(time.time() - t0, 1),
        }
        path = atomic_write_json(Path(b.output_dir) / f"{rid}__{slug}.json", record)
        record["_path"] = str(path)
        if b.get("update_record") and res["throughput"] is not None:
            rec_path = Path(b.get("records_dir") or rc.get("results_dir") or "results/runs") / f"{rid}.json"
            if rec_path.is_file():
                run_rec = read_record(rec_path)
                run_rec["throughput"] = res["throughput"]
                atomic_write_json(rec_path, run_rec)
                record["updated_record"] = str(rec_path)
            else:
                log.warning("run record %s not found (set bench.records_dir); throughput not written into it", rec_path)
        print(format_report(record))
        out.append(record)
    return out


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    import torch

    from .measure import MEASURED_MODEL, device_slug, measure_model, software_versions
    from .records import atomic_write_json

    b = cfg.bench
    if b.get("threads"):
        torch.set_num_threads(int(b.threads))
    torch.manual_seed(0)
    t0 = time.time()
    model = build_for_bench(cfg)
    schedule = compression_str(cfg.compression)
    res = measure_model(
        model, int(cfg.backbone.image_size), params=bool(b.params), flops=bool(b.flops),
        throughput=bool(b.throughput),
        throughput_kwargs=throughput_kwargs(b),
    )
    slug = device_slug(b.device)
    record = {
        "schema": 1,
        "kind": "bench",
        "run_id": f"bench__{cfg.backbone.name}__{cfg.method.name}{peft_suffix(cfg.get('peft'))}__{schedule}__{slug}",
        "backbone": cfg.backbone.name, "method": cfg.method.name,
        "method_key": method_key(cfg.method), "method_options": method_options(cfg.method), "schedule": schedule,
        "measured": MEASURED_MODEL if not peft_suffix(cfg.get("peft")) else
        f"inference model (peft={peft_choice(cfg.get('peft'))}: does not fold, kept and measured)",
        "weights": "loaded" if b.get("load_weights", False) else "random init (values do not affect MACs/throughput)",
        "merging_schedule": list(getattr(model.pyra_method, "schedule", []) or []),
        "params": res["params"], "flops": res["flops"], "throughput": res["throughput"],
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_rev": _git_rev(), "created": utc_now(),
        "versions": software_versions(), "wall_time_s": round(time.time() - t0, 1),
    }
    path = atomic_write_json(output_path(cfg, schedule), record)
    record["_path"] = str(path)
    print(format_report(record))
    return record


def _fmt_tokens(t: list[int]) -> str:
    if not t:
        return "-"
    return " -> ".join(str(v) for v in t)


def format_report(rec: dict[str, Any]) -> str:
    p, f, t = rec.get("params"), rec.get("flops"), rec.get("throughput")
    rows = [("model", f"{rec['backbone']} / {rec.get('method_key') or rec['method']}"
             + f" / {rec['schedule']}  -- {rec['measured']}")]
    if p:
        rows.append(("params", f"trainable {p['trainable']:,} | paper-counted {p['paper_counted']:,} = "
                               f"{p['paper_pct']:.3f}% of the backbone ({p['backbone']:,})"))
    if f:
        attn = f"{f['gmacs_attention']:.4g} G" if f.get("gmacs_attention") is not None else "n/a"
        rows.append(("MACs", f"{f['gmacs']:.5g} G per image [{f['counter']}], attention {attn}"))
        extra = f" | paper code (LoRA unmerged) {f['paper_gflops_lora_unmerged']:.4g}" \
            if f.get("paper_gflops_lora_unmerged") is not None else ""
        rows.append(("paper FLOPs", f"{f['paper_gflops']:.4g} G (fvcore / 2^30, the paper's unit){extra}"))
        cc = []
        for k, name in (("gmacs_flop_counter", "torch flop_counter/2"), ("gmacs_analytic", "analytic")):
            if f.get(k) is not None:
                cc.append(f"{name} {f[k]:.5g} G ({100 * f['disagreement'][k[6:]]:+.2f}%)")
        if f.get("gmacs_fvcore_no_attention") is not None:
            cc.append(f"plain fvcore w/o SDPA handle {f['gmacs_fvcore_no_attention']:.5g} G")
        rows.append(("cross-check", "; ".join(cc) or "-"))
        rows.append(("tokens", f"{_fmt_tokens(f['tokens_per_block'])} -> {f['tokens_final']} (entering each block -> final)"))
    if t:
        rows.append(("throughput", f"{t['img_per_s']:.2f} img/s (median-based {t['img_per_s_median']:.2f}); "
                                   f"{t['iters']} x batch {t['batch_size']} in {t['timed_s']:.1f} s after "
                                   f"{t['warmup_s']:.1f} s warm-up"))
        rows.append(("device", f"{t['device']} | {t['dtype']}{' (autocast)' if t['autocast'] else ''} | "
                               f"threads {t['threads']} | torch {t['versions']['torch']}, timm {t['versions']['timm']}"))
    if rec.get("_path"):
        rows.append(("record", rec["_path"]))
    if rec.get("updated_record"):
        rows.append(("run record", f"throughput written into {rec['updated_record']}"))
    w = max(len(k) for k, _ in rows)
    line = "=" * 100
    return "\n".join([line, *(f"{k:<{w}}  {v}" for k, v in rows), line])


@hydra_app(config_path=str(CONF_DIR), config_name="bench")  # hydra.main; --help alone: info.fast_help
def main(cfg: DictConfig) -> float | None:
    try:
        from .checks import check_bench_config

        check_bench_config(cfg)
        if cfg.bench.get("run"):
            recs = bench_runs(cfg)
            return (recs[-1].get("throughput") or {}).get("img_per_s")
        rec = run_bench(cfg)
    except InputError as e:
        exit_on_input_error(e, "pyra_bench.bench")
    t = rec.get("throughput") or {}
    return t.get("img_per_s")


def cli() -> None:
    """The console entry point: unknown group choices exit with status 2 before Hydra starts."""
    from .cli import precheck

    precheck("pyra_bench.bench", ("backbone", "method"))
    main()


if __name__ == "__main__":
    cli()
