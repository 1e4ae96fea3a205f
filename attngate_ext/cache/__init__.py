"""The cache wing: per-(batch, KV head) storage of the kept K/V and the ``transformers`` Cache that holds it."""

from .cache import AttnGateCache, AttnGateLayer

__all__ = ["AttnGateCache", "AttnGateLayer"]
