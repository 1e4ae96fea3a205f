"""The models wing: gated attention wired into Hugging Face Llama-style models.

* :mod:`.decoder`: reading a model (its decoder, its cache keyword, its shape);
* :mod:`.gated_attention`: :class:`GatedAttention`, the ``self_attn`` wrapper;
* :mod:`.model`: adding, removing and reading the gates; :mod:`.gate_files`: saving and loading them;
* :mod:`.calibration`: gate biases or a threshold for a target eviction ratio.
"""
