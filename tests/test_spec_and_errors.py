"""Reading checkpoints: schema variants across families and library versions, and clear errors for bad input."""

import json
import shutil

import numpy as np
import pytest

from bughunt.checkpoint import load_weights, validate_weights
from bughunt.errors import BughuntError
from bughunt.spec import load_spec, spec_from_config
from bughunt.tiny import make_tiny_checkpoint


def base_cfg(**kw):
    cfg = {"model_type": "llama", "vocab_size": 256, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg.update(kw)
    return cfg


def test_transformers4_and_5_rope_schemas_read_the_same():
    v4 = spec_from_config(base_cfg(rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    v5 = spec_from_config(base_cfg(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}))
    assert v4.rope == v5.rope
    assert v5.rope["full"].theta == 500000.0 and v5.rope["full"].factor == 4.0


def test_gemma3_per_layer_type_rope_and_legacy_local_base():
    new = spec_from_config(base_cfg(model_type="gemma3_text", head_dim=16, layer_types=["sliding_attention", "full_attention"],
                                    sliding_window=4, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                                       "full_attention": {"rope_type": "default", "rope_theta": 1e6}}))
    old = spec_from_config(base_cfg(model_type="gemma3_text", head_dim=16, sliding_window=4, sliding_window_pattern=2,
                                    rope_theta=1e6, rope_local_base_freq=10000.0))
    assert new.rope["sliding"].theta == old.rope["sliding"].theta == 10000.0
    assert new.rope["full"].theta == old.rope["full"].theta == 1e6
    assert new.layer_types == old.layer_types == ("sliding", "full")
    null = spec_from_config(base_cfg(model_type="gemma3_text", head_dim=16, sliding_window=4, sliding_window_pattern=2,
                                     rope_theta=1e6, rope_local_base_freq=None))  # null: not given (it raised TypeError)
    assert null.rope["sliding"].theta == 10000.0


def test_activation_fields_hidden_act_vs_hidden_activation():
    g2 = spec_from_config(base_cfg(model_type="gemma2", hidden_act="gelu", hidden_activation="gelu_pytorch_tanh"))
    assert g2.activation == "gelu_tanh"
    assert any("disagree" in n for n in g2.notes)
    legacy = spec_from_config(base_cfg(model_type="gemma", hidden_act="gelu"))
    assert legacy.activation == "gelu_tanh" and any("legacy" in n for n in legacy.notes)
    assert spec_from_config(base_cfg(hidden_act="silu")).activation == "silu"


def test_gemma2_query_scale_softcaps_and_default_alternation():
    s = spec_from_config(base_cfg(model_type="gemma2", head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
    assert s.query_scale == pytest.approx(24 ** -0.5)
    assert (s.attn_softcap, s.final_softcap) == (50.0, 30.0)
    assert s.layer_types == ("sliding", "full")
    assert s.embed_scale == pytest.approx(48 ** 0.5) and s.norm_form == "one_plus_w"


def test_phi3_fused_weights_and_partial_rotary(tiny):
    s = load_spec(tiny["phi3"])
    assert s.fused_qkv and s.fused_gate_up and s.rope["full"].partial_rotary_factor == 0.5
    w = load_weights(tiny["phi3"], s)
    assert w["model.layers.0.self_attn.qkv_proj.weight"].shape == ((s.num_heads + 2 * s.num_kv_heads) * s.head_dim, s.hidden_size)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    import transformers

    single = make_tiny_checkpoint("llama", tmp_path / "single")
    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, b = load_weights(single), load_weights(tmp_path / "sharded")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("case, message", [
    ("no-dir", "does not exist"),
    ("no-config", "no config.json"),
    ("bad-json", "not valid JSON"),
    ("unsupported", "model_type 'bert' is not supported"),
    ("missing-field", "'hidden_size' is missing"),
    ("no-weights", "has no weights"),
    ("shape", "implies"),
    ("pickle", "pickled weights"),
    ("truncated", "truncated"),
])
def test_bad_checkpoints_raise_one_clear_error(case, message, tmp_path, tiny):
    ck = tmp_path / "ck"
    if case != "no-dir":
        shutil.copytree(tiny["llama"], ck)
    cfg_path = ck / "config.json"
    if case == "no-config":
        cfg_path.unlink()
    elif case == "bad-json":
        cfg_path.write_text("{not json")
    elif case == "unsupported":
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": "bert"}))
    elif case == "missing-field":
        cfg = json.loads(cfg_path.read_text())
        del cfg["hidden_size"]
        cfg_path.write_text(json.dumps(cfg))
    elif case == "no-weights":
        (ck / "model.safetensors").unlink()
    elif case == "shape":
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "intermediate_size": 128}))
    elif case == "pickle":
        (ck / "model.safetensors").rename(ck / "pytorch_model.bin")
    elif case == "truncated":
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(BughuntError, match=message):
        load_weights(ck, load_spec(ck))


def test_pickle_refused_unless_explicitly_allowed(tmp_path, tiny):
    import torch

    ck = tmp_path / "pickled"
    shutil.copytree(tiny["llama"], ck)
    weights = load_weights(ck)
    (ck / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, ck / "pytorch_model.bin")
    with pytest.raises(BughuntError, match="--allow-pickle"):
        validate_weights(ck, load_spec(ck))
    loaded = load_weights(ck, allow_pickle=True)
    np.testing.assert_array_equal(loaded["model.norm.weight"], weights["model.norm.weight"])
