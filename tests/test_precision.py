"""`train.precision=auto`: bfloat16 on CPUs only where it was measured faster."""

import pytest

from kcls.config import ConfigError, apply_overrides
from kcls.recipes import load_recipe
from kcls.train.compute import BF16_CPU_SPEEDUP, cpu_flags, cpu_precision, resolve_precision
from kcls.workflows.prepare import prepare


def test_a_cpu_without_bfloat16_instructions_trains_in_float32():
    policy, reason = cpu_precision({"avx2", "avx512f", "fma"}, "compact_resnet")
    assert policy == "float32" and "without AVX512-BF16 or AMX-BF16" in reason


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_bfloat16_instructions_and_a_measured_speedup_give_mixed_bfloat16(flag):
    assert BF16_CPU_SPEEDUP["compact_resnet"] > 1
    policy, reason = cpu_precision({"avx2", flag}, "compact_resnet")
    assert policy == "mixed_bfloat16"
    assert flag in reason and f"{BF16_CPU_SPEEDUP['compact_resnet']:.2f}x" in reason


def test_a_backbone_not_measured_or_measured_slower_stays_float32():
    assert cpu_precision({"amx_bf16"}, "no_such_backbone") == (
        "float32", "auto: CPU (amx_bf16), no_such_backbone not measured in bfloat16")
    slower = [name for name, speedup in BF16_CPU_SPEEDUP.items() if speedup <= 1]
    for name in slower:
        assert cpu_precision({"amx_bf16"}, name)[0] == "float32"


def test_an_explicit_precision_is_used_as_given():
    assert resolve_precision("float32", "compact_resnet") == ("float32", "train.precision=float32")
    with pytest.raises(ConfigError, match="train.precision"):
        resolve_precision("float8", "compact_resnet")


def test_run_json_records_the_precision_chosen_on_this_machine_and_why(tmp_path):
    recipe = apply_overrides(load_recipe("quickstart"), [
        "model.backbone=compact_resnet", "data.batch_size=16",
        f"export.base_dir={tmp_path}"])
    record = prepare(recipe).record()
    assert (record["precision"], record["precision_reason"]) == cpu_precision(
        cpu_flags(), "compact_resnet")
    assert prepare(apply_overrides(recipe, ["train.precision=float32"])).record()[
        "precision_reason"] == "train.precision=float32"
