import pytest

from lorakit import LoraConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -4}, "r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"init_lora_weights": "corda"}, "init_lora_weights"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        LoraConfig(**kwargs)


def test_defaults_are_peft_defaults():
    import peft

    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out", "init_lora_weights",
                 "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_scaling_and_patterns():
    cfg = LoraConfig(r=16, lora_alpha=32, rank_pattern={r"layers\.0\.self_attn\.q_proj": 4}, alpha_pattern={"v_proj": 8})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_for("model.layers.10.self_attn.q_proj") == 16
    assert cfg.alpha_for("model.layers.3.self_attn.v_proj") == 8
    assert cfg.scaling(16, 32) == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling(16, 32) == 8.0


def test_from_dict_refuses_unsupported_peft_features():
    with pytest.raises(ValueError, match="use_qalora"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "use_qalora": True})
    assert LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "use_dora": True}).use_dora
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"})
    cfg = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "megatron_core": "x", "rank_pattern": None})
    assert cfg.r == 4 and cfg.rank_pattern == {}
