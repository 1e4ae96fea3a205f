"""The main job's configuration: :class:`Config` (what every section reads) and the command line that fills it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from attngate_ext.training.utils import DTYPES

# The sections of benchmarks/run.py, in the order it runs them ("real" only with --real).
SECTION_NAMES = ["ops", "bandwidth", "e2e", "memory", "real"]
RECT_OPS = ["gate_flags", "append_kv_", "compact_kv_", "decode_attention"]


@dataclass
class Config:
    """Everything a section needs to build and time its cases."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    seqs: List[int]
    head_dim: int
    gate_dim: int
    group: int
    keep_ratio: float
    ops: List[str]
    reps: int
    warmup: int
    ref_reps: int
    ref_warmup: int
    flush_l2: bool
    seed: int = 0
    sections: List[str] = field(default_factory=lambda: list(SECTION_NAMES))
    quick: bool = False  # every section then uses its tiny sizes
    e2e_prefill: Optional[int] = None  # e2e overrides of its device preset
    e2e_batch: Optional[int] = None


USAGE = """\
    python benchmarks/run.py                   # CPU: B=1 H=8 T=4096 D=128 float32; GPU: T in 4096, 32768, bf16
    python benchmarks/run.py --quick           # tiny smoke run (seconds)
    python benchmarks/run.py --ops compact_kv_ append_kv_ --seq 8192 --dtype bfloat16 --sections ops
    python benchmarks/run.py --sections e2e --e2e-prefill 2048 --e2e-batch 4
    python benchmarks/run.py --real            # also SmolLM2-135M: memory with trained gates, 8k prefill/decode
"""


def parse_args(argv: Optional[Sequence[str]] = None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, epilog=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--ops", nargs="+", choices=RECT_OPS, default=RECT_OPS, metavar="OP",
                   help=f"rectangle ops of the ops section, from {RECT_OPS} (default: all)")
    p.add_argument("--batch", type=int, default=None, help="B (default 1)")
    p.add_argument("--heads", type=int, default=None, help="H, KV heads (default 8)")
    p.add_argument("--seq", type=int, nargs="+", default=None,
                   help="T values, new tokens = cache capacity (default 4096 on CPU, 4096 32768 on CUDA)")
    p.add_argument("--head-dim", type=int, default=None, help="D (default 128)")
    p.add_argument("--gate-dim", type=int, default=64, help="G, gate output width (gate head dim x heads; default 64)")
    p.add_argument("--group", type=int, default=4, help="query heads per KV head in decode, Hq = group * H (default 4)")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="fraction of keep flags that are true (default 0.5)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 15 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up repetitions (default 3 CPU, 10 CUDA)")
    p.add_argument("--ref-reps", type=int, default=None, help="reference repetitions (default: reps on CPU, 10 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-flush", action="store_true", help="CUDA: do not flush the L2 cache between reps")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: B=1 H=2 T=256 D=64, 3 reps; tiny e2e model")
    p.add_argument("--sections", nargs="+", choices=SECTION_NAMES, default=None, metavar="SECTION",
                   help=f"sections to run, from {SECTION_NAMES} (default: all but real)")
    p.add_argument("--real", action="store_true",
                   help="add the real-model section (SmolLM2-135M, prepared by examples/real_assets.py; minutes)")
    p.add_argument("--e2e-prefill", type=int, default=None, help="e2e prompt tokens (default 1024 CPU, 4096 CUDA)")
    p.add_argument("--e2e-batch", type=int, default=None, help="e2e batch (default 1 CPU, 16 CUDA)")
    p.add_argument("--json", type=Path, default=None,
                   help="output file (default benchmarks/results/latest.json, quick.json with --quick)")
    return p.parse_args(argv)


def _sections(args: argparse.Namespace) -> List[str]:
    """--sections (default: every section but real, and but bandwidth off CUDA: it measures GPU bandwidth), plus real
    with --real; in SECTION_NAMES order."""
    skip = {"real"} | (set() if str(args.device).startswith("cuda") else {"bandwidth"})
    chosen = set(args.sections or [name for name in SECTION_NAMES if name not in skip])
    if args.real:
        chosen.add("real")
    return [name for name in SECTION_NAMES if name in chosen]


def make_config(args: argparse.Namespace) -> Config:
    """Resolves the defaults that depend on the device and on --quick."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def pick(value, quick, cpu, gpu):
        return value if value is not None else quick if args.quick else gpu if cuda else cpu

    reps = pick(args.reps, 3, 15, 50)
    warmup = pick(args.warmup, 1, 3, 10)
    return Config(
        device=device,
        dtype=DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32),
        batch=pick(args.batch, 1, 1, 1),
        heads=pick(args.heads, 2, 8, 8),
        seqs=pick(args.seq, [256], [4096], [4096, 32768]),
        head_dim=pick(args.head_dim, 64, 128, 128),
        gate_dim=args.gate_dim,
        group=args.group,
        keep_ratio=args.keep_ratio,
        ops=list(dict.fromkeys(args.ops)),
        reps=reps,
        warmup=warmup,
        ref_reps=pick(args.ref_reps, 3, reps, min(reps, 10)),
        ref_warmup=min(warmup, 3) if cuda else warmup,
        flush_l2=not args.no_flush,
        sections=_sections(args),
        quick=args.quick,
        e2e_prefill=args.e2e_prefill,
        e2e_batch=args.e2e_batch,
    )
