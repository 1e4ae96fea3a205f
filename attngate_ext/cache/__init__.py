"""The cache wing: per-(batch, KV head) storage of the kept K/V and the ``transformers`` Cache that holds it.

* :mod:`.cache`: :class:`AttnGateCache` (the ``transformers`` Cache); :mod:`.layer`: one layer of it;
* :mod:`.paged_kv`: :class:`PagedKV`, one layer's pages (every paged op is a method), sized by
  :mod:`.free_pages`; :mod:`.window`: the window ring; :mod:`.kept_kv`: a prefill chunk and a decode step of the
  model's K/V over both; :mod:`.gate_kv`: the gate's own K'/V' and its attention;
* :mod:`.memory`: :class:`MemoryReport`; :mod:`.policy`: :class:`TokenPolicy`, the interface of baselines.
"""

from .cache import AttnGateCache
from .layer import AttnGateLayer
from .memory import MemoryReport
from .paged_kv import PagedKV
from .policy import KeepEveryToken, TokenPolicy
