"""Ignored-field hypotheses and storage/precision toggles: each planted on the real HF model (a config override or a
wrapper), and the search names it; the clean model gives no false alarm. The reference side of every search on one
checkpoint is shared through `reference_traces`, so each plant costs one HF run and a few new reference settings."""

import sys

import pytest
import torch

from bughunt.errors import BughuntError
from bughunt.hypotheses import hypotheses
from bughunt.implementations.hf import HFRunner
from bughunt.implementations.reference import ReferenceRunner
from bughunt.spec import load_spec
from bughunt.sweep import sweep
from bughunt.toggles import parse_toggles


@pytest.fixture(scope="module")
def short(tokens):
    return tokens[:, :8]  # short inputs keep every search quick


@pytest.fixture(scope="module")
def reference_traces():
    return {}  # one dict for the module: keys name the checkpoint, input and dtype


# -- plants that are wrappers on the loaded model (each returns its undo) ----------------------------------------------
def round_weights(dtype):
    def plant(model):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).to(p.dtype))
        return lambda: None
    return plant


def kv_cache(dtype):
    def plant(model):
        attn = model.model.layers[0].self_attn
        module = sys.modules[type(attn).__module__]
        original = module.apply_rotary_pos_emb

        def rope_then_store(q, k, *args, **kwargs):
            q, k = original(q, k, *args, **kwargs)
            return q, k.to(dtype).to(k.dtype)

        module.apply_rotary_pos_emb = rope_then_store
        hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: out.to(dtype).to(out.dtype))
                 for layer in model.model.layers]

        def undo():
            module.apply_rotary_pos_emb = original
            for h in hooks:
                h.remove()
        return undo
    return plant


def softmax_in_model_dtype(model):
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):  # the requested fp32 upcast ignored: every step in x's dtype
        e = torch.exp(x - x.amax(dim, keepdim=True))
        return e / e.sum(dim, keepdim=True)

    torch.nn.functional.softmax = softmax
    return lambda: setattr(torch.nn.functional, "softmax", original)


def logits_in_fp32(model):
    head = model.lm_head
    h = head.register_forward_hook(lambda m, a, out: torch.nn.functional.linear(a[0].float(), m.weight.float()))
    return h.remove


def matmul_inputs(dtype):
    def plant(model):
        hooks = []
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(m.weight.to(dtype).to(m.weight.dtype))
                    hooks.append(m.register_forward_pre_hook(lambda mod, a: (a[0].to(dtype).to(a[0].dtype),)))
        return lambda: [h.remove() for h in hooks]
    return plant


GEMMA3_FULL = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}
GEMMA3_LOCAL = {"rope_type": "default", "rope_theta": 10000.0}
SLIDING, FULL = "sliding_attention", "full_attention"

# (id, family, dtype, how the HF candidate is planted, what the search must name)
PLANTS = [
    # ignored config fields, planted through config_overrides (or HF's own query-scale wrapper where shapes forbid it)
    ("query_pre_attn_scalar", "gemma2", "fp32", {"query_pre_attn_scalar": 16}, {"field:query_pre_attn_scalar": "ignored"}),
    ("attn_softcap", "gemma2", "fp32", {"attn_logit_softcapping": None}, {"field:attn_logit_softcapping": "ignored"}),
    ("final_softcap", "gemma2", "fp32", {"final_logit_softcapping": None}, {"field:final_logit_softcapping": "ignored"}),
    ("window-dropped", "gemma2", "fp32", {"layer_types": [FULL] * 4}, {"field:sliding_window": "ignored"}),
    ("all-sliding", "gemma2", "fp32", {"layer_types": [SLIDING] * 4}, {"field:layer_types": f"all:{SLIDING}"}),
    ("family-pattern", "gemma3", "fp32", {"layer_types": [SLIDING] * 4}, {"field:layer_types": "ignored"}),
    ("rope-scaling-dropped", "gemma3", "fp32", {"rope_parameters": {FULL: {"rope_type": "default", "rope_theta": 1e6}, SLIDING: GEMMA3_LOCAL}},
     {"field:rope_parameters.full_attention.rope_type": "ignored"}),
    ("local-rope-from-global", "gemma3", "fp32", {"rope_parameters": {FULL: GEMMA3_FULL, SLIDING: GEMMA3_FULL}},
     {"field:rope_parameters.sliding_attention": "ignored"}),
    ("head_dim", "llama", "fp32", {"query_scale": "rsqrt:12"}, {"field:head_dim": "ignored"}),
    ("rope_theta", "llama", "fp32", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
     {"field:rope_parameters.rope_theta": "ignored"}),
    ("rms_norm_eps", "phi3", "fp32", {"rms_norm_eps": 1e-5}, {"field:rms_norm_eps": "ignored"}),
    ("partial_rotary", "phi3", "fp32", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}},
     {"field:rope_parameters.partial_rotary_factor": "ignored"}),
    # storage and precision, planted with wrappers on the loaded model
    ("weights-fp16", "llama", "fp32", round_weights(torch.float16), {"weights_dtype": "fp16"}),
    ("weights-bf16", "gemma2", "fp32", round_weights(torch.bfloat16), {"weights_dtype": "bf16"}),
    ("kv-bf16", "llama", "fp32", kv_cache(torch.bfloat16), {"kv_dtype": "bf16"}),
    ("kv-fp8", "gemma2", "bf16", kv_cache(torch.float8_e4m3fn), {"kv_dtype": "fp8"}),  # HF bf16 is bit-exact with the reference here
    ("softmax-in-bf16", "llama", "bf16", softmax_in_model_dtype, {"attn_dtype": "model"}),
    ("logits-fp32", "llama", "bf16", logits_in_fp32, {"logits_dtype": "fp32"}),
    # untied llama: rounding a tied lm_head in place would round the input embedding too. Rounding an operand HF computed
    # in fp32 is fragile: an fp32 ulp between HF and the reference can flip one rounding (with fp16 operands and these
    # tokens, one does at layer.2.attn, which no setting explains).
    ("matmul-bf16", "llama", "fp32", matmul_inputs(torch.bfloat16), {"matmul_inputs": "bf16"}),
]


def candidate(checkpoint, dtype, tokens, plant):
    """The HF trace with the plant: a dict of config overrides, a dict of HF toggles ({"query_scale": ...}) or a wrapper."""
    spec = load_spec(checkpoint)
    toggles = plant if isinstance(plant, dict) and "query_scale" in plant else None
    overrides = plant if isinstance(plant, dict) and toggles is None else None
    with HFRunner(checkpoint, spec, dtype, toggles=toggles, config_overrides=overrides) as h:
        undo = plant(h.model) if callable(plant) else (lambda: None)
        try:
            return h.run(tokens)
        finally:
            undo()


def search(checkpoint, dtype, tokens, trace, reference_traces):
    result = sweep(checkpoint, impl="hf", dtype=dtype, mode="search", tokens=tokens, candidate_trace=trace,
                   reference_traces=reference_traces, isolate=False, render=False)
    return result, result.data["sweep"]["search"]


@pytest.mark.parametrize("name, family, dtype, plant, expected", PLANTS, ids=[p[0] for p in PLANTS])
def test_the_search_names_each_planted_hypothesis(name, family, dtype, plant, expected, tiny, short, reference_traces):
    tokens = short
    trace = candidate(tiny[family], dtype, tokens, plant)
    result, s = search(tiny[family], dtype, tokens, trace, reference_traces)
    # at fp32 the plant shows as is; at bf16 some stay inside the floor, and the search still finds them
    assert result.comparisons[0]["first_above_floor"] is not None or dtype == "bf16", "the plant must show as is"
    assert s["at_floor"], s["diagnosis"]
    (name_, value), = expected.items()
    named = next(p for p in s["explanations"] if {name_: value} in p["spellings"])  # the planted hypothesis, maybe spelled otherwise
    # anything else chosen is an emulation detail inside the floor: without it every point stays within the floor
    for a in s["ablation"]:
        assert a["toggle"] == named["toggle"] or a["first_above_floor_without"] is None, s["ablation"]
    field = next(iter(expected))
    if field.startswith("field:"):  # the diagnosis says what it means, in words
        assert "as if " in s["diagnosis"] and field.split(":")[1].split(".")[0] in s["diagnosis"]


@pytest.mark.parametrize("family, dtype", [("gemma2", "fp32"), ("gemma3", "fp32"), ("llama", "fp32"), ("phi3", "fp32"), ("llama", "bf16")])
def test_clean_pairs_give_no_false_alarm(family, dtype, tiny, short, reference_traces):
    tokens = short
    trace = candidate(tiny[family], dtype, tokens, {})
    result, s = search(tiny[family], dtype, tokens, trace, reference_traces)
    assert s["best"] == {} and s["at_floor"] and result.comparisons[0]["first_above_floor"] is None
    assert "agrees with the reference as it is" in s["diagnosis"]


def test_hypotheses_come_from_the_config_not_from_a_list(tiny):
    # A field no known case mentions: the tiny gemma2 config with an explicit, non-default hidden activation. Ignoring
    # it gives the family's default; the generator finds it because spec.py falls back to that default.
    spec = load_spec(tiny["gemma2"])
    config = {**spec.source, "hidden_activation": "gelu"}
    from bughunt.spec import spec_from_config

    found = {(h.toggle, h.value): h.description for h in hypotheses(spec_from_config(config))}
    assert found[("field:hidden_activation", "ignored")] == "as if it ignored hidden_activation (activation gelu_exact -> gelu_tanh)"
    assert ("field:vocab_size", "ignored") not in found  # a shape: no forward pass could follow it
    assert not any(t == "field:bos_token_id" for t, _ in found)  # read by nothing in the forward pass


def test_field_toggles_are_checked_against_the_checkpoint(tiny):
    spec = load_spec(tiny["llama"])
    assert parse_toggles({"field:head_dim": "ignored"}, spec) == {"field:head_dim": "ignored"}
    with pytest.raises(BughuntError, match="allowed values are config, ignored"):
        parse_toggles({"field:head_dim": "all:x"}, spec)
    with pytest.raises(BughuntError, match="changes nothing the forward pass reads"):
        parse_toggles({"field:bos_token_id": "ignored"}, spec)
    with pytest.raises(BughuntError, match="field hypotheses go on the reference"):
        HFRunner(tiny["llama"], spec, "fp32", toggles={"field:head_dim": "ignored"})
    r = ReferenceRunner(tiny["llama"], spec, "fp32", toggles={"field:head_dim": "ignored"})
    assert r.spec.query_scale == pytest.approx(12 ** -0.5) and r.spec.head_dim == 16  # the weights keep their shapes
