"""What each model family adds to Llama's attention (q/k norms, fused qkv, partial rotary, soft-capping, sliding-window
layers, Llama 3 RoPE scaling), that the gated model reproduces it, and the models that are refused.

Identity at init, incremental decode under eviction and left-padded batches of every family are parametrized in
test_gated_model.py, save/load in test_gated_cache.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

import attngate_ext as ag
from attngate_ext import cache_kwarg
from attngate_ext.cache.memory import measure_layer
from attngate_ext.models.families import LLAMA
from attngate_ext.models.model import gated_layers
from attngate_ext.models.window_attention import WindowAttention

from helpers.gated import gated_model, incremental_logits
from helpers.models import WINDOW, make_model, random_ids


def _as_plain_llama(model) -> None:
    """Makes every wrapper compute Llama's attention: no q/k norms, no soft-cap, no sliding window."""
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.family, attn.softcap = LLAMA, 0.0
        if isinstance(attn, WindowAttention):
            attn.window = 10**9


@pytest.mark.parametrize("kind", ["qwen3", "olmo2", "gemma2", "gemma3"])
@torch.no_grad()
def test_the_family_steps_matter(kind):
    # The identity tests would pass for a wrapper that skipped the family's steps only if those steps did nothing.
    model = make_model(kind)
    ids = random_ids(2, 3 * WINDOW)
    base = model(ids, use_cache=False).logits
    ag.add_attention_gates(model)
    torch.testing.assert_close(model(ids, use_cache=False).logits, base, rtol=1e-5, atol=1e-5)
    _as_plain_llama(model)
    assert (model(ids, use_cache=False).logits - base).abs().max() > 1e-2


# Qwen2 / Qwen3 slide on the layers from max_window_layers on when use_sliding_window is set.
_QWEN_SLIDING = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)


@pytest.mark.parametrize("kind,overrides,sliding", [("gemma2", {}, 0), ("gemma3", {}, 0),
                                                    ("qwen2", _QWEN_SLIDING, 1), ("qwen3", _QWEN_SLIDING, 1)])
@torch.no_grad()
def test_sliding_window_layers_see_exactly_the_transformers_window(kind, overrides, sliding):
    # Query i sees j when 0 <= i - j < window: one slot more or less changes the output.
    model = make_model(kind, **overrides)
    ids = random_ids(2, 5 * WINDOW, seed=4)
    base = model(ids, use_cache=False).logits
    ag.add_attention_gates(model)
    window_layer = model.model.layers[sliding].self_attn
    assert isinstance(window_layer, WindowAttention) and window_layer.window == WINDOW
    assert [type(layer.self_attn) for layer in model.model.layers].count(WindowAttention) == 1
    steps, _ = incremental_logits(model, ids, 3, step=1)
    torch.testing.assert_close(steps, base, rtol=1e-4, atol=1e-4)
    for shifted in (WINDOW - 1, WINDOW + 1):
        window_layer.window = shifted
        assert (model(ids, use_cache=False).logits - base).abs().max() > 1e-3, shifted


@torch.no_grad()
def test_sliding_window_layers_carry_no_gate_and_hold_their_window_only():
    model = gated_model("gemma2", protect_recent=2)
    assert [attn.layer_idx for attn in gated_layers(model)] == [1] and len(ag.gates(model)) == 1
    assert {name.split(".")[1] for name in ag.gate_state_dict(model)} == {"1"}
    window_attn = model.model.layers[0].self_attn
    assert {id(p) for p in window_attn.parameters()} == {id(p) for p in window_attn.attention.parameters()}
    cache = ag.AttnGateCache()
    ids = random_ids(2, 40, seed=2)
    model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, **{cache_kwarg(model): cache})
    window, gated = cache.layers
    B, H, D, seen = 2, model.config.num_key_value_heads, model.config.head_dim, 45
    assert window.gate_kv is None and window.kv.num_pages == 0 and window.window.capacity == WINDOW
    layer = measure_layer(window)
    ring = B * H * WINDOW * (2 * D * 4 + 2)  # K and V in float32, the visible and keep flags
    assert layer.kv_bytes == ring and layer.gate_bytes == 0 and layer.free_page_bytes == 0
    assert layer.dense_bytes == B * H * seen * 2 * D * 4
    report = cache.memory_report()
    # The report counts the window layer: its K/V and its dense twin; it sees its last WINDOW - 1 earlier rows.
    assert report.kv_bytes == layer.kv_bytes + measure_layer(gated).kv_bytes
    assert report.dense_bytes == 2 * layer.dense_bytes
    assert report.retention_per_layer[0] == pytest.approx((WINDOW - 1) / seen)
    assert 0.3 < 1 - report.retention_per_layer[1] < 0.7


@torch.no_grad()
def test_saved_gates_name_their_layers_and_refuse_other_layer_types(tmp_path):
    model = gated_model("gemma2")
    ag.save_gates(model, str(tmp_path))
    flipped = make_model("gemma2", layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match=r"for layers \[1\], this model gates layers \[0\]"):
        ag.load_gates(flipped, str(tmp_path))


def test_gemma_gates_train_through_a_later_sliding_window_layer():
    # Layer 0 is gated, layer 1 slides: the gate's gradient flows back through the window layer's training
    # attention (soft-capped), and the training forward equals the inference forward with the same flags.
    model = gated_model("gemma2", protect_recent=2,
                        model_overrides=dict(layer_types=["full_attention", "sliding_attention"]))
    ids = random_ids(2, 3 * WINDOW, seed=6)
    with torch.no_grad():
        expected = model(ids, labels=ids, use_cache=False).loss
    model.train()
    loss = model(ids, labels=ids).loss  # use_cache left at the default: the gated model ignores the empty cache
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    grad = ag.gates(model)[0].score.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.model.layers[1].self_attn.attention.q_proj.parameters())


@torch.no_grad()
def test_llama3_rope_scaling_with_the_gate_sharing_the_model_tables():
    # The scaling changes the model (the test sequences pass the 16-token original context)...
    ids = random_ids(2, 60, seed=8)
    plain = make_model("llama3rope", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert (make_model("llama3rope")(ids).logits - plain(ids).logits).abs().max() > 1e-3
    # ...and a gate as wide as the model's heads reuses its llama3-scaled tables (a narrower one builds plain
    # tables from rope_theta: test_gated_model.py). Decode under eviction equals the full forward either way.
    model = gated_model("llama3rope", head_dim=16, protect_recent=2, calibration_ids=ids)
    full = model(ids, use_cache=False).logits
    steps, _ = incremental_logits(model, ids, 30)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


_SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
REFUSED = {
    "gpt-oss": (lambda: GptOssForCausalLM(GptOssConfig(**_SMALL, head_dim=16, num_local_experts=2,
                                                       num_experts_per_tok=1)),
                r"GptOssForCausalLM: layer 0 \(GptOssAttention\) is not supported: attention sinks"),
    "deepseek-v3": (lambda: DeepseekV3ForCausalLM(DeepseekV3Config(
        **_SMALL, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=2)),
        r"DeepseekV3ForCausalLM: .* multi-head latent attention"),
    "smollm3-nope": (lambda: SmolLM3ForCausalLM(SmolLM3Config(**_SMALL, no_rope_layers=[1, 0])),
                     r"SmolLM3ForCausalLM: layer 1 .* no rotary position embedding"),
    "cohere-qk-norm": (lambda: CohereForCausalLM(CohereConfig(**_SMALL, use_qk_norm=True)),
                       r"CohereForCausalLM: layer 0 \(CohereAttention\) .* q/k norms"),
    "gemma3-bidirectional": (lambda: Gemma3ForCausalLM(Gemma3TextConfig(**_SMALL, head_dim=16,
                                                                        use_bidirectional_attention=True)),
                             r"Gemma3ForCausalLM: .* bidirectional"),
    # Llama 4's chunked layers (and linear-attention layers) are neither full nor sliding attention.
    "chunked-layers": (lambda: Qwen2ForCausalLM(Qwen2Config(**_SMALL, layer_types=["full_attention",
                                                                                 "chunked_attention"])),
                       r"Qwen2ForCausalLM: layer types \['chunked_attention'\] are not supported"),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)),
             r"GPT2LMHeadModel is not a Llama-style decoder: .* fused `c_attn` without RoPE"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_attention_is_refused_naming_the_model_and_the_missing_piece(name):
    make, message = REFUSED[name]
    with pytest.raises(TypeError, match=message):
        ag.add_attention_gates(make())
