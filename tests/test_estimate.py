"""GPU-hour estimates of planned runs from measured records (pyra_bench.estimate), worked by hand."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from pyra_bench.data.tasks import get_task
from pyra_bench.estimate import gpu_hours, split_size
from pyra_bench.methods import METHODS, Method, Stage


def _cfg(method="tome", backbone="vit_b16_in21k", task="dtd", compression="high", protocol="final", epochs=100,
         eval_every=10, **kwargs):
    return OmegaConf.create({"task": {"name": task}, "backbone": {"name": backbone},
                             "method": {"name": method, "kwargs": kwargs}, "compression": compression,
                             "protocol": protocol, "trainer": {"epochs": epochs, "eval_every": eval_every}})


def _rec(method="tome", schedule="high", task="dtd", train=None, infer=None, test_images=None, backbone="vit_b16_in21k"):
    return {"status": "completed", "task": task, "backbone": backbone, "method": method, "schedule": schedule,
            "training_cost": {k: {"img_per_s": v, "device": "NVIDIA H100"} for k, v in (train or {}).items()},
            "throughput": {"img_per_s": infer} if infer else None, "metrics": {"test_images": test_images}}


class TwoStage(Method):
    name = "twostage_for_test"
    cost_factor = 0.5

    def stages(self):
        return [Stage("search", 0.3, evaluate=False), Stage("train")]


@pytest.fixture
def twostage():
    METHODS.add(TwoStage.name, TwoStage)
    yield TwoStage.name
    METHODS._items.pop(TwoStage.name)


def test_measured_records_of_the_same_method_and_operating_point():
    recs = [_rec(train={"train": 90.0}, infer=900.0, test_images=5000), _rec(train={"train": 110.0}, infer=1100.0),
            _rec(schedule="low", train={"train": 10.0}, infer=10.0)]  # another operating point: not used
    hours, basis = gpu_hours(_cfg(), recs)
    # 100 epochs x 1000 images at the median 100 img/s + 10 evaluations x 5000 test images at 1000 img/s
    assert hours == pytest.approx((100 * 1000 / 100 + 10 * 5000 / 1000) / 3600)
    assert basis.startswith("measured: 2 record(s) of vit_b16_in21k/tome/high") and "NVIDIA H100" in basis
    assert "10 evaluations x 5000 images" in basis


def test_stages_are_timed_with_their_own_speeds(twostage):
    recs = [_rec(twostage, train={"search": 400.0, "train": 100.0}, infer=1000.0)]
    hours, basis = gpu_hours(_cfg(twostage), recs)
    # search: round(0.3 x 100) = 30 epochs (no evaluation), train: 100 epochs and 10 evaluations of DTD's
    # 1,880 test images (its TFDS test split)
    assert hours == pytest.approx((30 * 1000 / 400 + 100 * 1000 / 100 + 10 * 1880 / 1000) / 3600)
    assert "130 epochs" in basis and "test split (TFDS sizes)" in basis


def test_other_methods_records_are_scaled_by_cost_factor(twostage):
    recs = [_rec("peft", "none", train={"train": 100.0}, infer=300.0)]  # PEFT: cost_factor 1.0 (the default)
    hours, basis = gpu_hours(_cfg(twostage, protocol="tuning"), recs)
    speed = 100.0 * 1.0 / 0.5  # half the training cost per image
    # tuning: train800 for 130 epochs, 10 evaluations of val200; inference at 3x the training speed
    assert hours == pytest.approx((130 * 800 / speed + 10 * 200 / (3 * speed)) / 3600)
    assert basis.startswith("scaled: 1 record(s) of other methods on vit_b16_in21k, x 2.00 (cost_factor)")


def test_without_records_the_papers_throughput_is_a_labelled_fallback():
    hours, basis = gpu_hours(_cfg("pyra", compression="high"), [])
    tp = 1365.0  # the paper's Table 3: PYRA, ViT-B/16, high, on an RTX 3090
    assert hours == pytest.approx((100 * 1000 / (tp / 3) + 10 * 1880 / tp) / 3600)
    assert basis.startswith("fallback (no records of vit_b16_in21k): the paper's RTX 3090 inference throughput "
                            "(pyra/high, 1365 img/s)")


def test_nothing_to_go_on_is_nan_and_says_so():
    hours, basis = gpu_hours(_cfg(backbone="vit_tiny_test", task="digits"), [])
    assert math.isnan(hours) and basis.startswith("unknown: no records of vit_tiny_test")


@pytest.mark.parametrize("task,expected", [("cifar100", 10000), ("dsprites_loc", 73728), ("smallnorb_azi", 12150),
                                           ("clevr_count", 15000), ("dmlab", 22735), ("sun397", 21750),
                                           ("diabetic_retinopathy", 42670)])
def test_test_split_sizes_from_the_tfds_split_strings(task, expected):
    """VTAB-1k test splits: dSprites train[663552:] of 737,280; sNORB test[50%:] of 24,300; CLEVR validation."""
    spec = get_task(task)
    assert split_size(spec.resolve_splits(spec.reference_sizes)["test"], spec.reference_sizes) == expected


def test_split_size_of_unions_and_unknown_splits():
    assert split_size("train[:800]+validation[:200]", {"train": 5000, "validation": 900}) == 1000
    assert split_size("train[-100:]", {"train": 5000}) == 100
    assert split_size("other", {"train": 5000}) is None
