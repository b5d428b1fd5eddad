"""The GPU check on the CPU: gpu_check.py --quick (every step, end to end, with the tiny test ViT) and its
shell wrapper scripts/gpu_check.sh."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_shell_wrapper_runs_the_python_steps_with_their_environment():
    """scripts/gpu_check.sh only installs carried wheels, sets the environment and execs gpu_check.py."""
    sh = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    assert 'exec "$PY" scripts/gpu_check.py "$@"' in sh and "CUBLAS_WORKSPACE_CONFIG" in sh
    assert '--no-index --find-links "$WHEELS"' in sh


def test_gpu_check_quick_runs_every_step(tmp_path, monkeypatch):
    """gpu_check.py --quick (in this process; its two training runs are subprocesses, as on the GPU)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.chdir(tmp_path)
    import gpu_check

    gpu_check.main(["--quick", "--work-dir", str(tmp_path)])
    (js,) = tmp_path.glob("cpu-*.json")
    rep = json.loads(js.read_text())
    assert rep["status"] == {"throughput": "ok", "training": "ok", "data": "ok", "runs": "ok"}
    assert js.with_suffix(".md").read_text().startswith("# GPU check:")
    # every method x schedule x dtype, with the derived ratios
    rows = rep["throughput"]["rows"]
    assert {(r["method"], r["schedule"], r["dtype"]) for r in rows} == {
        (m, s, d) for m, s in [("peft", "none"), ("tome", "low"), ("pyra", "low"), ("tome", "high"), ("pyra", "high")]
        for d in ("float32", "bfloat16")}
    assert all(r["img_per_s"] > 0 and 0 < r["macs_ratio"] <= 1 for r in rows)
    assert all((r["pyra_vs_tome"] is not None) == (r["method"] == "pyra") for r in rows)
    assert len(rep["training"]["rows"]) == 10
    assert rep["data"]["device_normalise_bit_identical"] and rep["data"]["table_bit_identical"]
    runs = rep["runs"]
    assert runs["deterministic"] and runs["weights_identical"] and runs["tensors_compared"] > 0
    assert "trainer.deterministic=true" in runs["command"] and runs["test_images"] == 40


def test_gpu_check_refuses_without_cuda(tmp_path, monkeypatch):
    import pytest
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available.*--quick"):
        gpu_check.main(["--work-dir", str(tmp_path)])
