"""The ops wing: typed wrappers of ``torch.ops.attngate.*``, their fakes and their pure-PyTorch references.

* :mod:`.rectangle`: ``gate_flags`` and the rectangle-cache ops (``append_kv_``, ``compact_kv_``, ``decode_attention``);
* :mod:`.paged`: the paged ops (``paged_*``) and ``gather_pages``;
* :mod:`.fakes`: the fake (meta) implementation of every op, for ``torch.compile``;
* :mod:`.reference`, :mod:`.paged_reference`: the pure-PyTorch twins the tests compare the kernels against;
* :mod:`.switches`: ``set_sync_checks`` / ``sync_checks`` and ``cuda_kernels_available``.
"""

from . import fakes, paged_reference, reference  # noqa: F401  (fakes: registers the fake of every op)
from .paged import (
    gather_pages,
    paged_append_kv_,
    paged_compact_kv_,
    paged_decode_attention,
    paged_decode_step_,
    paged_prefill_attention,
    paged_remove_rows_,
)
from .rectangle import append_kv_, compact_kv_, decode_attention, gate_flags
from .switches import cuda_kernels_available, set_sync_checks, sync_checks
