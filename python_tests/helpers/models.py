"""Tiny random Llama / Mistral / Qwen2 models built from configs, and helpers shared by the model tests."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 100  # the character tokenizer of make_tokenizer has 100 entries
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)

KINDS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),  # multi-head
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=512)),  # GQA
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),  # GQA, q/k/v bias
}


def make_model(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 model in eval mode with SDPA attention; ``overrides`` change config fields."""
    config_cls, model_cls, extra = KINDS[kind]
    torch.manual_seed(seed)
    config = config_cls(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval()
    if kind == "qwen2":  # Qwen2 initialises its attention biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.5)
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
