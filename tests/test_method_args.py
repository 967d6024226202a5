"""--method-args parsing and validation against a method's config dataclass (harness/method_args.py)."""

import pytest

from harness.method_args import MethodArgsError, apply, parse
from harness.spec import SpecError, expand
from methods.adpdm import ADPDMConfig
from methods.qdiffusion import QDiffusionConfig


def test_parse_splits_methods_and_pairs():
    assert parse(["adpdm:lr=0, groups=4", "tdq:hidden=32"]) == {"adpdm": {"lr": "0", "groups": "4"},
                                                                 "tdq": {"hidden": "32"}}
    for bad in ("adpdm", "adpdm:", "adpdm:lr", "adpdm:=1", "adpdm:lr=1,lr=2"):
        with pytest.raises(MethodArgsError):
            parse([bad])
    with pytest.raises(MethodArgsError, match="twice"):
        parse(["adpdm:lr=0", "adpdm:groups=4"])


def test_values_follow_the_field_annotation():
    base = QDiffusionConfig.from_preset("fast").to_dict()
    cfg, label = apply("qdiffusion", QDiffusionConfig, base,
                       {"a_symmetric": "no", "softmax_bits": "16", "w_lr": "2e-3", "split": "none"})
    assert (cfg["a_symmetric"], cfg["softmax_bits"], cfg["w_lr"], cfg["split"]) == (False, 16, 0.002, None)
    assert label == "a_symmetric=false,softmax_bits=16,split=none,w_lr=0.002"  # sorted keys: one label per variant
    assert cfg["joint"] is True  # the preset's other fields are kept
    with pytest.raises(MethodArgsError, match="expected bool"):
        apply("qdiffusion", QDiffusionConfig, base, {"a_symmetric": "maybe"})
    with pytest.raises(MethodArgsError, match="expected int"):
        apply("qdiffusion", QDiffusionConfig, base, {"weight_iters": "none"})  # int, not int | None


def test_unknown_key_lists_the_known_ones_and_invalid_choice_fails():
    base = ADPDMConfig.from_preset("fast").to_dict()
    with pytest.raises(MethodArgsError, match=r"did you mean lr\?.*known keys: .*weight_rule"):
        apply("adpdm", ADPDMConfig, base, {"lrr": "0"})
    with pytest.raises(MethodArgsError, match="preset"):  # the preset is chosen with --preset, not here
        apply("adpdm", ADPDMConfig, base, {"preset": "paper"})
    with pytest.raises(MethodArgsError, match="weight_rule must be one of"):
        apply("adpdm", ADPDMConfig, base, {"weight_rule": "bogus"})


def test_expand_records_the_variant_in_spec_and_hash():
    plain = {s.label: s for s in expand("adpdm,tdq", "tiny-random", "w4a8")}
    varied = {s.label: s for s in expand("adpdm,tdq", "tiny-random", "w4a8", method_args=["adpdm:lr=0"])}
    assert sorted(varied) == ["adpdm[lr=0.0]", "fp", "tdq"]
    v, p = varied["adpdm[lr=0.0]"], plain["adpdm"]
    assert v.method_config["lr"] == 0.0 and p.method_config["lr"] != 0.0
    assert v.config_hash != p.config_hash and v.to_dict()["variant"] == "lr=0.0"
    assert varied["tdq"].config_hash == plain["tdq"].config_hash  # other methods untouched
    assert "variant" not in p.to_dict()  # specs without a variant keep the hash they had before the field
    assert v.fp_reference().config_hash == plain["fp"].config_hash
    with pytest.raises(SpecError, match="does not quantize with"):
        expand("adpdm", "tiny-random", "w4a8", method_args=["fp:x=1"])
