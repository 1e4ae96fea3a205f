"""Tiny random models of every supported family (Llama, Mistral, Qwen2, Qwen3, OLMo-2, Phi-3, Gemma 2, Gemma 3, Llama 3
RoPE scaling) built from configs, and helpers shared by the model tests."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 100  # the character tokenizer of make_tokenizer has 100 entries
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)

WINDOW = 8  # the sliding window of the families that mix sliding-window and full-attention layers
# Layer 0 slides, layer 1 attends to everything: the gates go on layer 1 only.
_MIXED = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
_GEMMA = dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, **_MIXED)  # scale 24 ** -0.5, not 16's

KINDS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),  # multi-head
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=512)),  # GQA
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),  # GQA, q/k/v bias
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=16)),  # per-head q/k norms
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, dict(num_key_value_heads=2)),  # q/k norms over the whole projection
    # fused qkv_proj; half the head rotates (Phi-4-mini's partial rotary)
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(num_key_value_heads=2, partial_rotary_factor=0.5)),
    # soft-capped scores (make_model scales the queries up so that the scores reach the cap), sliding layer 0
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(attn_logit_softcapping=5.0, **_GEMMA)),
    # per-head q/k norms, sliding layer 0 with its local RoPE base
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, **_GEMMA)),
    # Llama 3.x RoPE scaling, with an original context short enough for the test sequences to reach the scaling
    "llama3rope": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
}
# The families whose attention differs from Llama's (the tests of each family run on these).
FAMILIES = ("qwen3", "olmo2", "phi3", "gemma2", "gemma3", "llama3rope")


def make_model(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 model in eval mode with SDPA attention; ``overrides`` change config fields."""
    config_cls, model_cls, extra = KINDS[kind]
    torch.manual_seed(seed)
    config = config_cls(**{**_COMMON, **extra, **overrides})
    # SDPA has no soft-capping: Gemma 2's scores are capped by the eager attention only.
    config._attn_implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if kind == "qwen2":  # Qwen2 initialises its attention biases to zero; make them matter
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(std=0.5)
            if getattr(config, "attn_logit_softcapping", None):  # random scores are ~0.1: far below any cap
                attn.q_proj.weight.mul_(100.0)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:  # q/k norms start as identities (weights 1, or 0 in Gemma's 1 + w form)
                    norm.weight.add_(torch.randn(norm.weight.shape) * 0.5)
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads 1-D prompts into ``(input_ids, attention_mask)``."""
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.numel():] = prompt
        mask[row, width - prompt.numel():] = 1
    return ids, mask


def make_tokenizer():
    """A character-level fast tokenizer (printable ASCII + newline), built offline: ``<pad>`` 0, ``<s>`` 1,
    ``</s>`` 2, ``<unk>`` 3."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny_model(path, kind: str = "llama") -> None:
    """Writes a tiny random model and the character tokenizer to ``path`` (a local model directory)."""
    make_model(kind).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
