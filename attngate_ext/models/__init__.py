"""The models wing: gated attention wired into Hugging Face decoder-only models (Llama, Mistral, Qwen2, Qwen3,
OLMo-2, Phi-3, Gemma 2, Gemma 3).

* :mod:`.decoder`: reading a model (its decoder, its cache keyword, its shape, its sliding-window layers);
* :mod:`.families`: how each family computes its query, key and value, and what is refused;
* :mod:`.wrapped_attention`: what the two ``self_attn`` wrappers share; :mod:`.gated_attention`:
  :class:`GatedAttention`, the wrapper with a gate; :mod:`.window_attention`: ``WindowAttention``, the ungated
  sliding-window layers;
* :mod:`.model`: adding, removing and reading the gates; :mod:`.gate_files`: saving and loading them;
* :mod:`.calibration`: gate biases or a threshold for a target eviction ratio.
"""
