"""Parameter accounting against the paper's numbers, and schedules against the spec's token counts."""

import pytest

from pyra_bench.models import (
    ScheduleError,
    build_model,
    check_schedule,
    count_parameters,
    resolve_schedule,
    token_counts,
)
from pyra_bench.models.schedules import tome_linear_schedule
from pyra_bench.registry import UnknownChoiceError


@pytest.mark.slow
def test_vit_b16_lora_and_pyra_counts_match_paper():
    model = build_model("vit_b16_in21k", 100, "pyra", "high")
    pc = count_parameters(model, model.pyra_method)
    assert pc.lora == 294_912  # Table 1: 0.29M
    assert round(pc.backbone / 1e6) == 86  # Table 1: 86M
    assert round(pc.lora / pc.backbone * 100, 2) == 0.34  # PEFT row "# params"
    assert round(pc.paper_pct, 2) == 0.35  # PYRA row
    assert pc.method_paper == 192 + 12 * 768  # W_r (Table 6: 0.19K) + W_D per merging block
    assert pc.trainable == 399_652  # the authors' logged n_parameters for CIFAR-100 PYRA high
    peft = build_model("vit_b16_in21k", 2, "tome", "high")
    assert count_parameters(peft, peft.pyra_method).trainable == 296_450  # authors' ToMe Camelyon log


@pytest.mark.slow
def test_vit_l16_lora_count_matches_paper():
    model = build_model("vit_l16_in21k", 100, "peft")
    pc = count_parameters(model, model.pyra_method)
    assert pc.lora == 1_179_648  # Table 1: 1.18M
    assert round(pc.backbone / 1e6) == 303
    assert round(pc.paper_pct, 2) == 0.39


@pytest.mark.parametrize("variant,expected", [
    ("gated", 73_728),  # Table 8: 73.73K = 12 x (768*4 + 4*768)
    ("direct", 768 * 192),  # Table 7 prints 70.66K (= 768 x 92): a slip, see spec section 3
    ("wr", 192),  # Table 6 "plain W_r": 0.19K
])
def test_ablation_parameter_counts(variant, expected):
    model = build_model("vit_b16_in21k", 10, "pyra", "high", method_kwargs={"variant": variant})
    assert model.pyra_method.paper_param_count(model) == expected


@pytest.mark.parametrize("family,name,n,final", [
    ("vit_b", "low", 197, 11), ("vit_b", "high", 197, 5),
    ("vit_l", "low", 197, 7), ("vit_l", "high", 197, 5),
    ("deit_b", "low", 198, 42), ("deit_b", "high", 198, 6),
])
def test_paper_schedules_final_token_counts(family, name, n, final):
    depth = 24 if family == "vit_l" else 12
    sched = resolve_schedule(name, depth, family)
    protected = 2 if family == "deit_b" else 1
    assert check_schedule(sched, n, protected)[-1] == final


def test_vit_b_high_per_block_counts():
    sched = resolve_schedule("high", 12, "vit_b")
    assert token_counts(sched, 197) == [197, 157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]


def test_schedule_forms():
    assert resolve_schedule(None, 4) == [0, 0, 0, 0]
    assert resolve_schedule("r8", 3) == [8, 8, 8]
    assert resolve_schedule(5, 2) == [5, 5]
    assert resolve_schedule([3, 2, 0, 0], 4) == [3, 2, 0, 0]
    # ToMe's parse_r((16, -0.5)) over 12 layers: linear from 24 down to 8 (hand-worked)
    assert tome_linear_schedule(12, 16, -0.5) == [24, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8]
    assert resolve_schedule({"r": 16, "inflection": -0.5}, 12) == resolve_schedule("tome:16,-0.5", 12)
    with pytest.raises(UnknownChoiceError, match="valid choices: .*high, low"):
        resolve_schedule("medium", 12, "vit_b")
    with pytest.raises(ScheduleError, match="13 entries"):
        resolve_schedule([1] * 13, 12)


def test_schedule_forms_are_never_padded_cut_or_truncated():
    """Official ToMe pads a short list with zeros and int() truncates 1.7 to 1; here both are refused by
    name (a schedule written for another depth, a fraction of a token), as is an inflection outside [-1, 1]
    (which would give a block a negative r)."""
    with pytest.raises(ScheduleError, match=r"has 2 entries but the backbone has 4 blocks \(depth 4\)"):
        resolve_schedule([3, 2], 4)
    with pytest.raises(ScheduleError, match=r"1\.7 is not a whole number"):
        resolve_schedule([1.7, 1, 1], 3)
    assert resolve_schedule([2.0, 1, 0], 3) == [2, 1, 0]
    with pytest.raises(ScheduleError, match=r"1\.7 is not a whole number"):
        resolve_schedule({"r": 1.7}, 3)
    with pytest.raises(ScheduleError, match=r"inflection 5\.0 of tome:4,5 is outside \[-1, 1\]"):
        resolve_schedule("tome:4,5", 12)
    with pytest.raises(ScheduleError, match=r"outside \[-1, 1\]"):
        resolve_schedule({"r": 4, "inflection": -1.5}, 12)
    with pytest.raises(ScheduleError, match="r of tome:-4,0 is -4"):
        resolve_schedule("tome:-4,0", 12)
    assert resolve_schedule("tome:4,1", 3) == [0, 4, 8]


def test_infeasible_schedule_names_layer_and_token_count():
    with pytest.raises(ScheduleError, match=r"block 1 has 9 tokens .*at most 4 .*r=5"):
        build_model("vit_tiny_test", 3, "tome", [8, 5, 0])


def test_peft_refuses_a_schedule():
    with pytest.raises(ValueError, match="does not compress"):
        build_model("vit_tiny_test", 3, "peft", "low")


def test_unknown_backbone_and_method_list_choices():
    with pytest.raises(UnknownChoiceError, match="valid choices: .*vit_b16_in21k"):
        build_model("vit_b32", 3, "peft")
    with pytest.raises(UnknownChoiceError, match="valid choices: .*pyra.*tome"):
        build_model("vit_tiny_test", 3, "tomme")
