"""Safe on a shared cluster: files pyra_bench loads are data (no import chosen by a file), data stays inside
its root, the input cache verifies what it serves and falls back to the JPEGs on any OS error, OS write
errors end a run with one message, one writer per run folder, a diverged run is a failure (never a
result), and the tables skip malformed records by name. Each test makes the failure itself happen: a
read-only or full file system (a real mount where this user may make one), a real ``ulimit -f``, a real
SIGKILL, two processes started together."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.runs import run_config, run_overrides

from pyra_bench.records import iter_records

ROOT = Path(__file__).resolve().parent.parent
RUN = ["task=digits", "backbone=vit_tiny_test", "trainer=smoke", "method=tome", "compression=low",
       "logger=none", "callbacks=none", "verify_images=false"]


def _overrides(tmp_path, *extra):
    return run_overrides(RUN, tmp_path, *extra)


def _cfg(tmp_path, *extra):
    return run_config(RUN, tmp_path, *extra)


def _train_cli(tmp_path, monkeypatch, capsys, *extra):
    """``python -m pyra_bench.train`` in this process: (exit status, stdout + stderr + pyra_bench's log)."""
    from helpers.cli import run_entry_point

    from pyra_bench.train import cli

    code, out, err = run_entry_point(cli, "pyra_bench/train.py", _overrides(tmp_path, *extra), tmp_path,
                                     monkeypatch, capsys, env={"HYDRA_FULL_ERROR": "0"})
    return code, out + err


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "HYDRA_FULL_ERROR": "0"}


# ---------------------------------------------------------------------------------------------------------
# 1. loaded files are data
# ---------------------------------------------------------------------------------------------------------
PROBE = "probe_target_{tag}"


def _probe_module(folder: Path, tag: str) -> tuple[str, Path]:
    """A module in ``folder`` (the current folder, on ``sys.path`` as under ``python -m``) whose import writes
    a marker file: proof that a file chose code to run."""
    name, marker = PROBE.format(tag=tag), folder / f"imported_{tag}"
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Foo:\n    pass\n")
    return name, marker


@pytest.mark.parametrize("method_name", ["pyra", "foo"])
def test_bench_run_on_an_export_naming_a_target_imports_nothing(tmp_path, monkeypatch, capsys, method_name):
    from helpers.cli import run_entry_point

    from pyra_bench.bench import cli

    module, marker = _probe_module(tmp_path, method_name)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    config = {"method": {"name": method_name, "_target_": f"{module}.Foo", "kwargs": {}}, "task": {"name": "digits"}}
    (run / "inference_model.json").write_text(json.dumps({"format": 2, "tensors": "inference_model.safetensors",
                                                          "method_state": {}, "config": config}))
    (run / "inference_model.safetensors").write_bytes(b"\0" * 64)
    code, _, err = run_entry_point(cli, "pyra_bench/bench.py", [f"bench.run={run}", f"bench.output_dir={tmp_path}/b"],
                                   tmp_path, monkeypatch, capsys, env={"HYDRA_FULL_ERROR": "0"})
    assert code == 2, err[-2000:]
    assert f"_target_ '{module}.Foo'" in err and "nothing was imported" in err and "Traceback" not in err
    assert not marker.exists() and module not in sys.modules
    assert not (tmp_path / "b").exists()


def test_the_estimate_and_the_record_check_import_nothing_a_record_names(tmp_path, capsys):
    from pyra_bench import sweep
    from pyra_bench.records import write_record

    module, marker = _probe_module(tmp_path, "estimate")
    sys.path.insert(0, str(tmp_path))
    try:
        results = tmp_path / "results"
        cfg = _cfg(tmp_path)
        from pyra_bench.identity import run_id

        for rid, method in ((run_id(cfg), "tome"), ("digits__vit_tiny_test__foo__low__seed0", "foo")):
            write_record(results, {
                "run_id": rid, "status": "completed", "task": "digits", "backbone": "vit_tiny_test", "method": method,
                "schedule": "low", "seed": 0, "metrics": {"test_top1": 50.0, "test_images": 797},
                "training_cost": {"train": {"img_per_s": 100.0, "device": "cpu"}},
                "config": {"method": {"name": method, "_target_": f"{module}.Foo"}}})
        assert sweep.main(["dry-run", *_overrides(tmp_path)]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert "GPU-h" in capsys.readouterr().out
    assert not marker.exists() and module not in sys.modules


# ---------------------------------------------------------------------------------------------------------
# 2. a diverged run is a failure; the tables skip malformed records by name
# ---------------------------------------------------------------------------------------------------------
def test_a_diverged_run_ends_non_zero_and_is_recorded_as_failed(tmp_path, monkeypatch, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="pyra_bench"):
        code, out = _train_cli(tmp_path, monkeypatch, capsys, "trainer.lr=1e12", "trainer.max_steps_per_epoch=2")
    text = out + caplog.text
    assert code == 1, text[-3000:]
    assert "training diverged: the loss became nan in epoch 2" in text
    assert "the last finite epoch loss was" in text and "(epoch 1)" in text
    assert "; lr 5e+11." in text  # epoch 2 of 2 after one warm-up epoch: the cosine's midpoint, 1e12 / 2
    assert "retry" not in text and "Traceback" not in text
    failed = json.loads(next((tmp_path / "results" / "failed").glob("*.json")).read_text())
    assert failed["status"] == "failed" and "diverged" in failed["error"]
    assert iter_records([tmp_path / "results"]) == [], "no record of the diverged run"
    from pyra_bench.lifecycle import read_checkpoint_meta

    (ckpt,) = (tmp_path / "runs").rglob("last.ckpt")
    assert read_checkpoint_meta(ckpt)["epoch"] == 1, "the last finite epoch is kept, the diverged one not saved"


def test_tables_skip_and_name_records_of_the_wrong_types_or_ranges(tmp_path, capsys):
    import pandas as pd
    from test_tables import _rec, _record, _row, _tables

    from pyra_bench.records import write_record

    runs = tmp_path / "runs"
    for seed in (0, 1):
        _rec(runs, "dtd", 50.0 + seed, seed=seed)
    bad_seed = _rec(runs, "dtd", 60.0, seed="abc", run_tag="s")
    bad_acc = _rec(runs, "dtd", 250.0, seed=2)
    bad_tuning = write_record(runs, {**_record("dtd", None, seed=3), "protocol": "tuning",
                                     "metrics": {"val_top1": 250.0}})
    _tables(runs, tmp_path / "out", "tables=[3]")
    err = capsys.readouterr().err
    assert f"{bad_tuning} left out of the tuning table (val_top1 250.0 is not a number in [0, 100])" in err
    assert f"{bad_seed} (seed 'abc' is not an integer)" in err
    assert f"{bad_acc} (test_top1 250.0 is not a number in [0, 100])" in err
    row = _row(pd.read_csv(tmp_path / "out" / "table3.csv"), "ToMe")
    assert row["DTD"] == pytest.approx(50.5) and row["DTD std"] == pytest.approx(0.5 ** 0.5)  # seeds 0, 1 only


# ---------------------------------------------------------------------------------------------------------
# 3. one writer per run folder; 4. OS write errors end the run clearly; 7. run folders and stage files
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """The digits task in the VTAB folder format (JPEGs as :func:`pyra_bench.data.write_digits_folder` writes
    them), the first 48 images of each split only (a 48-image cache entry at 32 px is 147 KB); shared by the
    folder-data tests of this module."""
    import numpy as np
    from PIL import Image

    from pyra_bench.data.embedded import digits_arrays, digits_split_indices
    from pyra_bench.data.tasks import SPLITS

    root = tmp_path_factory.mktemp("vtab")
    images, labels = digits_arrays()
    for split in SPLITS:
        (root / "digits" / "images" / split).mkdir(parents=True)
        lines = []
        for j, i in enumerate(digits_split_indices(split)[:48]):
            rel = f"images/{split}/{j:06d}.jpg"
            Image.fromarray(np.repeat(images[i][:, :, None], 3, axis=2), mode="RGB").save(root / "digits" / rel,
                                                                                         quality=75)
            lines.append(f"{rel} {int(labels[i])}")
        (root / "digits" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_two_identical_commands_started_together_train_the_run_once(tmp_path, monkeypatch, capsys, caplog):
    """The same command in a process of its own and, started at the same moment, in this one (one
    interpreter start less). Whichever takes the run folder's lock holds it -- waiting in ``on_fit_start`` for
    a file written once the other command has ended -- so the other must exit 75 at once, naming the run,
    this host and the holder's process id, having trained nothing. The holder ends with the one record."""
    import socket
    import threading

    go = tmp_path / "go"
    args = _overrides(tmp_path, "trainer.max_steps_per_epoch=1", f"+callbacks.hold.path={go}",
                      "+callbacks.hold.timeout=400", "+callbacks.hold._target_=helpers.lifecycle_callbacks.WaitForFile")
    p = subprocess.Popen([sys.executable, "-m", "pyra_bench.train", *args], cwd=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sub: dict[str, str] = {}
    waiter = threading.Thread(target=lambda: (sub.setdefault("out", p.communicate(timeout=400)[0]),
                                              go.write_text("go")))
    waiter.start()
    try:
        with caplog.at_level(logging.INFO, logger="pyra_bench"):
            here, out = _train_cli(tmp_path, monkeypatch, capsys, *args[len(RUN) + 2:])
        out += caplog.text
        if here == 75:
            go.write_text("go")
        waiter.join(400)
    finally:
        if p.poll() is None:
            p.kill()
    assert sorted([here, p.returncode]) == [0, 75], out[-3000:] + "\n----\n" + sub.get("out", "")[-3000:]
    holder_pid, other_out = (os.getpid(), sub["out"]) if here == 0 else (p.pid, out)
    assert f"is running in another process: host {socket.gethostname()}, process {holder_pid}" in other_out
    assert "Traceback" not in other_out and "stage 1/1" not in other_out, "the second one trained nothing"
    (rec,) = iter_records([tmp_path / "results"])
    assert rec["status"] == "completed" and rec["metrics"]["test_top1"] is not None
    run_dir = Path(rec["run_dir"])
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / ".run.owner.json").exists()


def test_a_file_size_limit_ends_the_run_with_one_message_and_the_same_command_resumes(tmp_path, digits_folder,
                                                                                          monkeypatch, capsys, caplog):
    """A run stopped (SIGTERM) after epoch 1 of 2 leaves its checkpoint; the same command again under a real
    ``ulimit -f`` of 20 KiB -- below a checkpoint of the tiny ViT (~32 KB) and its input-cache entries (147 KB),
    above its config and log files: the cache build fails with EFBIG (one warning, the run reads the JPEGs),
    epoch 2 trains and its checkpoint cannot be written: one message naming the file and the limit, exit
    status 1, no retry, no traceback, nothing half-written, epoch 1's checkpoint intact. Without the limit the
    same command resumes after epoch 1 and records the run."""
    import resource

    from pyra_bench.lifecycle import read_checkpoint_meta

    limit = 20 * 1024
    data = [f"data_root={digits_folder}", "task.source=folder", f"data.cache_dir={tmp_path}/cache",
            "export_inference_model=false"]
    stop = ["data.cache=false", "+callbacks.term._target_=helpers.lifecycle_callbacks.SignalOnce",
            "+callbacks.term.epoch=1", f"+callbacks.term.signum={int(signal.SIGTERM)}",
            f"+callbacks.term.marker={tmp_path}/term.marker", "+callbacks.term.execution=true"]  # (not a result's)
    assert _train_cli(tmp_path, monkeypatch, capsys, *data, *stop)[0] == 128 + signal.SIGTERM
    (ckpt,) = (tmp_path / "runs").rglob("last.ckpt")
    assert read_checkpoint_meta(ckpt)["epoch"] == 1

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([sys.executable, "-m", "pyra_bench.train", *_overrides(tmp_path, *data)], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=300, preexec_fn=cap)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "retry" not in out and "resuming after epoch 1" in out
    assert out.count("[WARNING] - input cache: cannot use") == 1 and out.count("File too large") == 3, out[-3000:]
    assert "reading digits/train800val200 from its JPEG files" in out
    assert (f"cannot write last.ckpt in {ckpt.parent}: File too large -- the file-size limit of this process "
            f"(20.0 KiB, `ulimit -f` 20)") in out
    assert read_checkpoint_meta(ckpt)["epoch"] == 1, "the last good checkpoint is intact"
    assert not list(tmp_path.rglob("*.tmp*")) and not list((tmp_path / "results").glob("*.json"))
    with caplog.at_level(logging.INFO, logger="pyra_bench"):
        from pyra_bench.train import train_with_retries

        rec = train_with_retries(_cfg(tmp_path, *data))
    assert "resuming after epoch 1" in caplog.text
    assert rec["status"] == "completed" and (tmp_path / "results" / f"{rec['run_id']}.json").is_file()
    cost = rec["training_cost"]["train"]
    assert (cost["epochs_run"], cost["processes"]) == (2, 2), "epoch 2 trained again, after epoch 1 of the first"


def test_a_run_dir_holding_another_run_is_refused_and_a_damaged_stage_before_anything_is_written(
        tmp_path, monkeypatch, capsys):
    first = ["trainer.epochs=1", "trainer.warmup_epochs=0", "trainer.max_steps_per_epoch=1",
             "export_inference_model=false", f"run_dir={tmp_path}/shared"]
    assert _train_cli(tmp_path, monkeypatch, capsys, *first)[0] == 0
    config = (tmp_path / "shared" / "config.json").read_bytes()
    code, out = _train_cli(tmp_path, monkeypatch, capsys, *first, "method=pyra")
    assert code == 2 and f"run_dir={tmp_path}/shared holds another run, 'digits__vit_tiny_test__tome__low__seed0'" in out
    assert (tmp_path / "shared" / "config.json").read_bytes() == config, "nothing was written there"
    # a stage file whose tensors changed after it was written: refused by init_from before any run folder
    tensors = tmp_path / "shared" / "stages" / "train.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 0xFF
    tensors.write_bytes(bytes(raw))
    code, out = _train_cli(tmp_path, monkeypatch, capsys, *first[:-1],
                           f"init_from={tmp_path}/shared/stages/train.json", f"runs_root={tmp_path}/other",
                           f"results_dir={tmp_path}/other_results")
    assert code == 2 and f"{tensors} does not match its checksum" in out, out[-2000:]
    assert not (tmp_path / "other").exists() and not (tmp_path / "other_results").exists()


# ---------------------------------------------------------------------------------------------------------
# 6. data stays inside its root
# ---------------------------------------------------------------------------------------------------------
def _copy_task(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "digits", dst / "digits", symlinks=True)
    return dst


def test_an_image_linked_outside_the_task_folder_is_refused_naming_it(digits_folder, tmp_path):
    from pyra_bench.data import VTABDataModule
    from pyra_bench.data.folder import UnsafePathError

    root = _copy_task(digits_folder, tmp_path / "data")
    rel = (root / "digits" / "test.txt").read_text().split()[0]
    listed = root / "digits" / rel
    outside = tmp_path / "elsewhere" / "secret.jpg"
    outside.parent.mkdir()
    os.replace(listed, outside)
    listed.symlink_to(outside)
    with pytest.raises(UnsafePathError, match=f"resolve outside the task folder {root / 'digits'}") as e:
        VTABDataModule("digits", root, source="folder", image_size=32, cache=False)
    assert f"{listed} -> {outside}" in str(e.value) and "data.link_root" in str(e.value)
    dm = VTABDataModule("digits", root, source="folder", image_size=32, cache=False, link_root=tmp_path / "elsewhere")
    assert dm._dataset("test").samples[0][0] == listed  # the one named root is allowed


def test_a_task_name_that_is_a_path_is_refused(digits_folder, tmp_path, monkeypatch, capsys):
    code, out = _train_cli(tmp_path, monkeypatch, capsys, "task.source=folder", "task.name=../vtab/digits",
                           "task.num_classes=10", f"data_root={digits_folder}")
    assert code == 2 and "task.name='../vtab/digits' is not a plain name" in out, out[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing was written"


# ---------------------------------------------------------------------------------------------------------
# 5. the input cache verifies what it serves; OS errors fall back to the JPEGs; dead builders' files
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_process(monkeypatch):
    """What a new process knows about the cache: no entry verified yet, no warning given yet."""
    from pyra_bench.data import cache

    monkeypatch.setattr(cache, "_VERIFIED", set())
    monkeypatch.setattr(cache, "_WARNED", set())


def _mount_tmpfs(path: Path, *options: str) -> None:
    """A real file system of its own at ``path`` (tmpfs; needs the right to mount, e.g. root)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 512 KiB, unmounted afterwards."""
    mnt = tmp_path / "fs"
    _mount_tmpfs(mnt, "size=512k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only folder: a read-only mount where this user may mount (root ignores permission bits),
    else a folder without write permission."""
    ro = tmp_path / "ro"
    if os.geteuid() == 0:
        _mount_tmpfs(ro, "ro", "size=64k")
        yield ro
        subprocess.run(["umount", "-l", str(ro)], check=False)
    else:
        ro.mkdir()
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)


def _folder_run(tmp_path, digits_folder, cache_dir, *extra):
    from pyra_bench.train import train_with_retries

    return train_with_retries(_cfg(tmp_path, f"data_root={digits_folder}", "task.source=folder",
                                   f"data.cache_dir={cache_dir}", "export_inference_model=false",
                                   "trainer.max_steps_per_epoch=2", *extra))


def test_a_cache_entry_with_one_changed_byte_is_rebuilt_and_the_run_is_unchanged(tmp_path, digits_folder, caplog,
                                                                                 fresh_process):
    first = _folder_run(tmp_path / "a", digits_folder, tmp_path / "cache")
    entries = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(entries) == 2 and all(e["built_now"] for e in first["data"]["input_cache"].values())
    for npy in entries:  # bit rot: one pixel byte flipped, the file's size and mtime as they were
        st = npy.stat()
        with open(npy, "r+b") as f:
            f.seek(st.st_size - 7)
            b = f.read(1)
            f.seek(st.st_size - 7)
            f.write(bytes([b[0] ^ 0x10]))
        os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns))
    from pyra_bench.data import cache

    cache._VERIFIED.clear()  # a new process: nothing checked yet
    with caplog.at_level(logging.WARNING, logger="pyra_bench.data.cache"):
        second = _folder_run(tmp_path / "b", digits_folder, tmp_path / "cache")
    damaged = [r for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 2 and all("checksum does not match" in r.getMessage() for r in damaged)
    assert all(e["built_now"] for e in second["data"]["input_cache"].values())
    assert second["metrics"]["test_top1_by_epoch"] == first["metrics"]["test_top1_by_epoch"]


@pytest.mark.parametrize("where", ["read_only", "full"])
def test_a_read_only_or_full_cache_folder_is_one_warning_and_a_run_from_the_jpegs(tmp_path, digits_folder, caplog,
                                                                                 fresh_process, request, where):
    folder = request.getfixturevalue("read_only_dir" if where == "read_only" else "small_fs")
    if where == "full":
        (folder / "someone_elses_data").write_bytes(b"\0" * (500 * 1024))  # 12 KiB left of 512
    with caplog.at_level(logging.WARNING):
        rec = _folder_run(tmp_path, digits_folder, folder / "cache")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert str(folder) in warned[0] and "digits/train800val200" in warned[0] and "JPEG files" in warned[0]
    assert ("Read-only file system" if os.geteuid() == 0 and where == "read_only" else
            "Permission denied" if where == "read_only" else "GB free") in warned[0]
    assert rec["status"] == "completed" and set(rec["data"]["input_cache"].values()) == {None}


def test_a_disk_filling_up_during_a_cache_build_falls_back_to_the_jpegs(tmp_path, digits_folder, small_fs, caplog,
                                                                        fresh_process, monkeypatch):
    """ENOSPC after the free-space check: another job fills the file system between the check and the build.
    (Written into a memory map, that would be a SIGBUS killing the run; the blocks are reserved first.)"""
    from pyra_bench.data import VTABFolderDataset, cache

    monkeypatch.setattr(cache, "_DISK_MARGIN", 0)  # a 512 KiB file system passes the check for a 147 KB entry
    ds = VTABFolderDataset(digits_folder, "digits", "test")
    original = cache._write_images

    def other_job_fills_the_disk_then_build(*args, **kwargs):
        with open(small_fs / "someone_elses_data", "wb") as f, pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        return original(*args, **kwargs)

    monkeypatch.setattr(cache, "_write_images", other_job_fills_the_disk_then_build)
    with caplog.at_level(logging.WARNING, logger="pyra_bench.data.cache"):
        assert cache.ensure_cached(ds, 32, cache_dir=small_fs / "cache") is None
    assert f"input cache: cannot use {small_fs / 'cache'} (ENOSPC: No space left on device)" in caplog.text
    assert [p.name for p in (small_fs / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_cache_build_killed_by_sigkill_leaves_nothing_a_later_run_or_the_size_limit_misses(tmp_path, digits_folder,
                                                                                               caplog, fresh_process):
    """A builder process (forked from this one: the build is PIL and numpy only) is SIGKILLed while it fills
    its entry; the next process using the cache removes its temporary file and says so."""
    from pyra_bench.data import VTABFolderDataset
    from pyra_bench.data.cache import ensure_cached

    folder = tmp_path / "cache"
    pid = os.fork()
    if pid == 0:  # the builder: hangs at its 21st image, as a pre-empted job would stop anywhere
        try:
            original = VTABFolderDataset.load_image
            VTABFolderDataset.load_image = lambda self, i: time.sleep(300) if i == 20 else original(self, i)
            ensure_cached(VTABFolderDataset(digits_folder, "digits", "test"), 32, cache_dir=folder)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 60
        while not list(folder.glob(".*.building")) and time.monotonic() < deadline:
            time.sleep(0.05)
        (temp,) = folder.glob(".*.building")
        assert temp.stat().st_size == 48 * 3 * 32 * 32 + 128  # the half-filled entry (its header included)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert temp.exists(), "SIGKILL skips every finally: the temporary file is left"
    one = (48 * 3 * 32 * 32 + 128) / 1e9
    with caplog.at_level(logging.INFO, logger="pyra_bench.data.cache"):
        entry = ensure_cached(VTABFolderDataset(digits_folder, "digits", "test"), 16, cache_dir=folder,
                              max_gb=1.5 * one)
    assert "removed 1 temporary file(s) of builders that died" in caplog.text
    assert entry.built and not temp.exists()
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".lock", ".lock", ".npy"]


def test_a_live_builders_temporary_file_counts_against_the_size_limit_and_is_kept(tmp_path, digits_folder, caplog,
                                                                                    fresh_process):
    from pyra_bench.data import VTABFolderDataset
    from pyra_bench.data.cache import _lock, ensure_cached

    folder = tmp_path / "cache"
    one = (48 * 3 * 16 * 16 + 128) / 1e9  # GB of a 48-image entry at 16 px
    old = ensure_cached(VTABFolderDataset(digits_folder, "digits", "test"), 16, cache_dir=folder, max_gb=2.5 * one)
    live = folder / f".{'f' * 32}.{os.getpid() + 1}.0000.building"  # another process's build, in progress
    live.write_bytes(b"\0" * int(one * 1e9))
    with _lock(folder, "f" * 32, timeout=0):
        with caplog.at_level(logging.INFO, logger="pyra_bench.data.cache"):
            new = ensure_cached(VTABFolderDataset(digits_folder, "digits", "val200"), 16, cache_dir=folder,
                                max_gb=2.5 * one)
    assert new.built and live.exists(), "a live builder's file is never removed"
    assert not old.path.exists() and "evicted" in caplog.text, "old + live + new > 2.5 entries: the old one goes"


@pytest.mark.parametrize("damage", ["truncated", "object_array", "folder_is_a_file"])
def test_a_truncated_or_foreign_entry_is_rebuilt_and_a_cache_folder_that_is_a_file_falls_back(
        tmp_path, digits_folder, caplog, fresh_process, damage):
    import numpy as np
    import xxhash

    from pyra_bench.data import VTABFolderDataset
    from pyra_bench.data.cache import ensure_cached

    ds, folder = VTABFolderDataset(digits_folder, "digits", "val200"), tmp_path / "cache"
    if damage == "folder_is_a_file":
        folder.write_text("not a folder")
    else:
        entry = ensure_cached(ds, 16, cache_dir=folder)
        if damage == "truncated":
            with open(entry.path, "r+b") as f:
                f.truncate(entry.nbytes // 2)
        else:  # an object array (a pickle inside a .npy) whose description was made to match it
            np.save(entry.path, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
            meta = json.loads(entry.path.with_suffix(".json").read_text())
            data = entry.path.read_bytes()
            meta.update(bytes=len(data), xxh3_64=xxhash.xxh3_64_hexdigest(data))
            entry.path.with_suffix(".json").write_text(json.dumps(meta))
        from pyra_bench.data import cache

        cache._VERIFIED.clear()
    with caplog.at_level(logging.WARNING, logger="pyra_bench.data.cache"):
        again = ensure_cached(ds, 16, cache_dir=folder)
    warnings_ = [r.getMessage() for r in caplog.records
                 if r.name == "pyra_bench.data.cache" and r.levelno >= logging.WARNING]
    assert len(warnings_) == 1, warnings_
    (warning,) = warnings_
    if damage == "folder_is_a_file":
        assert again is None and f"cannot use {folder} (EEXIST: File exists)" in warning
    else:
        why = "36992 were written" if damage == "truncated" else "not a memory-mappable array"
        assert "is damaged" in warning and why in warning and again.built
        assert np.load(again.path, mmap_mode="r").shape == (48, 3, 16, 16)


def test_an_export_naming_the_class_of_the_users_own_method_config_is_accepted(tmp_path, monkeypatch, capsys):
    """The same check lets through what the command line itself names: the plug-in method config of
    ``tests/plugins`` (``_target_: pyra_plugin_demo.MyMethod``); the load then goes on to the tensors."""
    from helpers.cli import run_entry_point

    from pyra_bench.bench import cli

    plugins = ROOT / "tests" / "plugins"
    monkeypatch.syspath_prepend(str(plugins))
    run = tmp_path / "run"
    run.mkdir()
    config = {"method": {"name": "mymethod", "_target_": "pyra_plugin_demo.MyMethod", "kwargs": {}}}
    (run / "inference_model.json").write_text(json.dumps({"format": 2, "method_state": {}, "config": config}))
    (run / "inference_model.safetensors").write_bytes(b"\0" * 64)
    code, _, err = run_entry_point(cli, "pyra_bench/bench.py", [
        f"hydra.searchpath=[file://{plugins / 'conf'}]", "method=mymethod", f"bench.run={run}",
        f"bench.output_dir={tmp_path}/b"], tmp_path, monkeypatch, capsys, env={"HYDRA_FULL_ERROR": "0"})
    assert code == 2 and "nothing was imported" not in err
    assert "inference_model.safetensors is not a readable safetensors file" in err, err[-2000:]
