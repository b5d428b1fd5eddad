"""A run's identity follows from the settings schema: every result-changing setting counts, over the union of
keys (a Lightning option given with ``+trainer.``, a callback such as SWA), a key an older record lacks is read
as its schema default, and one ``train`` composes its config at most twice and builds its model once to check it."""

from __future__ import annotations

import json

import pytest
from helpers.runs import run_config, run_overrides

from pyra_bench.errors import SettingsMismatchError
from pyra_bench.identity import result_settings, settings_diff
from pyra_bench.records import read_record

# one epoch of one step on the tiny ViT: seconds
RUN = ["task=digits", "backbone=vit_tiny_test", "trainer=smoke", "method=tome", "compression=low", "trainer.epochs=1",
       "trainer.warmup_epochs=0", "trainer.max_steps_per_epoch=1", "export_inference_model=false", "logger=none",
       "callbacks=none", "verify_images=false"]
CLIP = "+trainer.gradient_clip_val=1.0"
SWA = ["+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging", "+callbacks.swa.swa_lrs=0.01",
       "+callbacks.swa.swa_epoch_start=1"]


def _train(tmp_path, *extra):
    from pyra_bench.train import train_with_retries

    return train_with_retries(run_config(RUN, tmp_path, *extra))


@pytest.fixture(scope="module")
def clipped(tmp_path_factory):
    """A run trained with gradient clipping: its folder and record."""
    tmp = tmp_path_factory.mktemp("clipped")
    rec = _train(tmp, CLIP)
    assert rec["status"] == "completed"
    return tmp, rec


def test_a_setting_given_on_one_side_only_is_a_difference(clipped):
    """The record was made with clipping; the same run without it is not skipped as 'the same settings'."""
    tmp, rec = clipped
    with pytest.raises(SettingsMismatchError, match=r"trainer.gradient_clip_val: 1.0 then, None now"):
        _train(tmp)
    assert settings_diff({"trainer.gradient_clip_val": None}, {}) == [], "absent = Lightning's default, null"


def test_a_result_changing_callback_is_part_of_the_identity_and_trains(clipped):
    """SWA against a record made without it: refused, not skipped; with its own run_tag it trains."""
    tmp, rec = clipped
    with pytest.raises(SettingsMismatchError, match=r"callbacks.swa._target_: None then, "
                                                    r"'lightning.pytorch.callbacks.StochasticWeightAveraging' now"):
        _train(tmp, CLIP, *SWA)
    swa = _train(tmp, CLIP, *SWA, "run_tag=swa")
    assert swa["status"] == "completed" and swa["run_id"].endswith("__swa")
    assert read_record(tmp / "results" / f"{swa['run_id']}.json")["settings"]["callbacks.swa.swa_lrs"] == 0.01
    # what cannot change a result is not part of it: a logging callback, one declared `execution: true`, the
    # workers, the progress bar
    cfg = run_config(RUN, tmp, CLIP)
    base = result_settings(cfg)
    other = result_settings(run_config(RUN, tmp, CLIP, "trainer.num_workers=3", "+trainer.enable_progress_bar=false",
                                       "+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor",
                                       "+callbacks.mine._target_=my.Timer", "+callbacks.mine.execution=true"))
    assert settings_diff(other, base) == []


def test_a_record_written_before_a_setting_was_added_is_still_reused(clipped):
    """The record lacks peft.dropout (added since, with the default that reproduces the old behaviour) and
    still names LoRA's options under their old trainer.* keys: the same run is skipped, not redone."""
    tmp, rec = clipped
    path = tmp / "results" / f"{rec['run_id']}.json"
    old = json.loads(path.read_text())
    for section in (old["settings"],):
        section.pop("peft.dropout")
        section["trainer.lora_init"] = section.pop("peft.init")
    old["config"]["peft"].pop("dropout")
    path.write_text(json.dumps(old))
    again = _train(tmp, CLIP)
    assert again["status"] == "skipped", again
    assert read_record(path)["settings"] == old["settings"], "the record is untouched"
    with pytest.raises(SettingsMismatchError, match=r"peft.dropout: 0.1 then, 0.2 now"):
        _train(tmp, CLIP, "peft.dropout=0.2")  # a changed value is still a difference


def test_one_train_composes_its_config_at_most_twice(clipped, monkeypatch, capsys):
    """The console entry point on an existing record (the whole check, no training): Hydra's config loader is
    asked at most twice, the model is built once (abstractly) to check the method and its operating point."""
    from helpers.cli import run_entry_point
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from pyra_bench import factory
    from pyra_bench.train import cli

    tmp, rec = clipped
    counts = {"compose": 0, "model": 0}
    load, make = ConfigLoaderImpl.load_configuration, factory.make_model

    def counted_load(self, *a, **k):
        counts["compose"] += 1
        return load(self, *a, **k)

    def counted_make(*a, **k):
        counts["model"] += 1
        return make(*a, **k)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counted_load)
    monkeypatch.setattr(factory, "make_model", counted_make)
    code, out, err = run_entry_point(cli, "pyra_bench/train.py", run_overrides(RUN, tmp, CLIP), tmp, monkeypatch,
                                     capsys, env={"HYDRA_FULL_ERROR": "0"})
    assert code == 0, (out + err)[-3000:]
    assert 1 <= counts["compose"] <= 2, counts
    assert counts["model"] == 1, counts
