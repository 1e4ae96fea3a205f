#!/usr/bin/env python
"""The main job: benchmarks every ``torch.ops.attngate`` op against its pure-PyTorch reference, then a whole model.

Sections, in this order (``--sections``; each prints its own table, every row also goes to the JSON file):

* ``ops``: the rectangle ops (``benchmarks/rect_ops.py``), the paged storage ops (``benchmarks/paged_storage.py``)
  and the paged attention ops (``benchmarks/paged_attention.py``), each against its reference;
* ``e2e``: a random-weight Llama-style model, dense vs gated at 0 / 50 / 75% eviction: prefill time, decode
  tokens/s and KV-cache bytes (``benchmarks/e2e.py``);
* ``memory``: the peak memory of a 16k-token chunked prefill, dense vs gated (``benchmarks/peak_memory.py``);
* ``real`` (only with ``--real``): SmolLM2-135M-Instruct, memory, speed and bfloat16 (``benchmarks/real_model.py``).

On CUDA the ops run with the device-side value checks' host read-back OFF (``attngate_ext.sync_checks(False)``).
The exit status is 1 when a row's one-off check against its reference failed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/run.py` from a source checkout (in-place build)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import attngate_ext  # noqa: E402
from benchmarks.config import SECTION_NAMES, Config, make_config, parse_args  # noqa: E402
from benchmarks.decode_bandwidth import decode_bandwidth_section  # noqa: E402
from benchmarks.e2e import e2e_section  # noqa: E402
from benchmarks.paged_attention import paged_attention_section  # noqa: E402
from benchmarks.paged_storage import paged_storage_section  # noqa: E402
from benchmarks.peak_memory import peak_memory_section  # noqa: E402
from benchmarks.printer import Row, environment, print_header  # noqa: E402
from benchmarks.real_model import real_model_section  # noqa: E402
from benchmarks.rect_ops import rect_ops_section  # noqa: E402

Section = Callable[[Config], List[Row]]
SECTIONS: List[Tuple[str, Tuple[Section, ...]]] = [
    ("ops", (rect_ops_section, paged_storage_section, paged_attention_section)),
    ("bandwidth", (decode_bandwidth_section,)),  # CUDA: decode, append, compaction against copy bandwidth
    ("e2e", (e2e_section,)),
    ("memory", (peak_memory_section,)),
    ("real", (real_model_section,)),
]
assert [name for name, _ in SECTIONS] == SECTION_NAMES


def prepare_device(cfg: Config) -> None:
    """Refuses a CUDA run without a GPU or without the CUDA kernels, and makes the run's GPU current."""
    if cfg.device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if not attngate_ext.cuda_kernels_available():
        raise SystemExit("--device cuda: attngate_ext was built without CUDA kernels "
                         "(rebuild with ATTNGATE_CUDA=1, or pass --device cpu)")
    if cfg.device.index is None:  # torch.cuda.set_device needs an index
        cfg.device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(cfg.device)


def run_sections(cfg: Config, names: Sequence[str]) -> List[Row]:
    """The rows of the named sections, run in SECTIONS order (without gradients, sync checks off on CUDA)."""
    rows: List[Row] = []
    checks = attngate_ext.sync_checks(False) if cfg.device.type == "cuda" else contextlib.nullcontext()
    with checks, torch.no_grad():
        for name, parts in SECTIONS:
            if name in names:
                for part in parts:
                    rows += part(cfg)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv, description=__doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    prepare_device(cfg)
    head = environment(cfg.device, cfg.flush_l2)
    print_header(head, cfg.reps, cfg.warmup, cfg.ref_reps, cfg.ref_warmup)
    rows = run_sections(cfg, cfg.sections)
    default = ROOT / "benchmarks" / "results" / ("quick.json" if args.quick else "latest.json")
    out = args.json or default
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, (torch.device, torch.dtype)) else v for k, v in asdict(cfg).items()}
    out.write_text(json.dumps({"header": head, "config": config, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwrote {len(rows)} rows to {out}")
    mismatches = [r for r in rows if r.check != "ok"]
    for r in mismatches:
        print(f"CHECK FAILED: {r.op} {r.shape}: {r.check}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
