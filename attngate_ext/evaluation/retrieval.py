"""Synthetic long-context retrieval, generated offline: a needle hidden at a chosen depth in real text, a question
at the end, and exact-match scoring of the answer under each eviction policy.

Needles (the kinds of RULER's needle-in-a-haystack tasks):

* ``passkey``: "The pass key is 68402. Remember it. 68402 is the pass key." / "What is the pass key? The pass key
  is" -> " 68402";
* ``fact``: "The special magic number for <word> is 4711." / "What is the special magic number for <word>? The
  special magic number for <word> is" -> " 4711".

An example is exactly ``length`` tokens: contiguous filler tokens from a random place of the text, the needle
inserted at ``depth`` of the filler (moved to the nearest line start within 48 tokens, so it does not split a
word), then the question and the answer. It is scored teacher-forced in one in-context pass: correct when every
answer token is the model's most likely next token (what greedy decoding would produce, since the eviction rule
is the same in prefill and decoding), with the policy evicting as the tokens arrive and holding its byte budget.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

KINDS = {
    "passkey": ("The pass key is {value}. Remember it. {value} is the pass key.",
                "What is the pass key? The pass key is", 5),
    "fact": ("The special magic number for {key} is {value}.",
             "What is the special magic number for {key}? The special magic number for {key} is", 4),
}
KEYS = ("harbor", "lantern", "orchard", "falcon", "meadow", "glacier", "copper", "violet", "canyon", "saffron",
        "thistle", "marble", "juniper", "beacon", "willow", "ember")
SNAP = 48  # the needle moves to the nearest line start within this many tokens of its depth


@dataclass
class RetrievalExample:
    """One example: ``input_ids`` (filler with the needle, the question, then the answer), the answer's last
    ``answer_len`` tokens, and how it was made (the needle starts at token ``needle_at`` of ``filler_len`` filler
    tokens)."""

    input_ids: List[int]
    answer_len: int
    kind: str
    depth: float
    answer: str
    needle_at: int
    filler_len: int

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def context_len(self) -> int:
        return len(self.input_ids) - self.answer_len


def _line_starts(tokenizer, ids: Sequence[int]) -> List[int]:
    """Positions right after a token that ends a line."""
    ends = {i for i in set(ids) if tokenizer.decode([i]).endswith("\n")}
    return [t + 1 for t, i in enumerate(ids) if i in ends]


def make_examples(tokenizer, filler: Sequence[int], lengths: Sequence[int], depths: Sequence[float],
                  per_cell: int = 1, kinds: Sequence[str] = ("passkey",), seed: int = 0) -> List[RetrievalExample]:
    """``len(lengths) * len(depths) * per_cell * len(kinds)`` examples from the token stream ``filler``.

    Deterministic for a seed. Raises ValueError when the stream is shorter than the longest example or a kind is
    unknown.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown retrieval kinds {unknown}; known: {sorted(KINDS)}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {list(depths)}")
    rng = random.Random(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                for kind in kinds:
                    needle, question, digits = KINDS[kind]
                    value = str(rng.randrange(10 ** (digits - 1), 10**digits))
                    key = rng.choice(KEYS)
                    needle_ids = encode("\n" + needle.format(value=value, key=key) + "\n")
                    question_ids = encode("\n" + question.format(key=key))
                    answer_ids = encode(" " + value)
                    size = length - len(needle_ids) - len(question_ids) - len(answer_ids)
                    if size < 1 or size > len(filler):
                        raise ValueError(f"cannot build a {length}-token example from {len(filler)} filler tokens")
                    start = rng.randrange(0, len(filler) - size + 1)
                    hay = list(filler[start : start + size])
                    at = _insertion_point(tokenizer, hay, round(depth * size))
                    ids = hay[:at] + needle_ids + hay[at:] + question_ids + answer_ids
                    examples.append(RetrievalExample(ids, len(answer_ids), kind, float(depth), value, at, size))
    return examples


def _insertion_point(tokenizer, hay: List[int], at: int) -> int:
    starts = [s for s in _line_starts(tokenizer, hay[max(at - SNAP, 0) : at + SNAP])]
    if not starts:
        return at
    offset = max(at - SNAP, 0)
    return min((s + offset for s in starts), key=lambda s: abs(s - at))


def exact_match(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: every target ``(B, A)`` is the argmax of its logits ``(B, A, V)``."""
    return (logits.argmax(dim=-1) == targets).all(dim=-1)


def groups(examples: Sequence[RetrievalExample]) -> Dict[Tuple[int, int], List[int]]:
    """Indices of the examples by ``(length, answer_len)``: each group stacks into one batch shape."""
    out: Dict[Tuple[int, int], List[int]] = {}
    for i, ex in enumerate(examples):
        out.setdefault((ex.length, ex.answer_len), []).append(i)
    return out


def score(logits_of: Callable[[torch.Tensor, int], Tuple[torch.Tensor, Dict[str, Any]]],
          examples: Sequence[RetrievalExample], batch_size: int = 4,
          tick: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    """Accuracy of ``examples`` with ``logits_of(ids (B, T), context_len) -> (logits (B, A, V), cache report)``
    giving the logits that predict the last ``A`` tokens. Returns the accuracy, its breakdown by depth, length and
    kind, the per-example results, and the mean eviction and held share the cache measured."""
    correct = [False] * len(examples)
    evicted, held = [], []
    for (length, answer_len), index in sorted(groups(examples).items()):
        for start in range(0, len(index), batch_size):
            part = index[start : start + batch_size]
            ids = torch.tensor([examples[i].input_ids for i in part])
            logits, report = logits_of(ids, length - answer_len)
            hits = exact_match(logits.float().cpu(), ids[:, length - answer_len :])
            for i, hit in zip(part, hits.tolist()):
                correct[i] = bool(hit)
            evicted.extend([report.get("eviction_ratio", 0.0)] * len(part))
            dense = report.get("dense_bytes")
            held.extend([report["kv_bytes"] / dense if dense else 1.0] * len(part))
            tick()

    def by(field: str) -> Dict[str, float]:
        values = sorted({getattr(ex, field) for ex in examples})
        return {str(v): sum(c for c, ex in zip(correct, examples) if getattr(ex, field) == v)
                / sum(1 for ex in examples if getattr(ex, field) == v) for v in values}

    return {"accuracy": sum(correct) / len(examples), "by_depth": by("depth"), "by_length": by("length"),
            "by_kind": by("kind"), "correct": correct, "eviction_ratio": sum(evicted) / len(evicted),
            "held_share": sum(held) / len(held), "examples": len(examples)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--retrieval-*`` options of ``python -m attngate_ext.evaluate``."""
    p.add_argument("--retrieval-text", nargs="+",
                   help="real text (files/directories) to hide needles in: scores every policy on the synthetic "
                        "retrieval task (at --budgets, or at --ratios without budgets)")
    p.add_argument("--retrieval-lengths", nargs="+", type=int, default=[2048, 3584], help="tokens per example")
    p.add_argument("--retrieval-depths", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="where the needle sits in the filler (0 = start, 1 = just before the question)")
    p.add_argument("--retrieval-per-cell", type=int, default=2, help="examples per (length, depth, kind)")
    p.add_argument("--retrieval-kinds", nargs="+", default=["fact"], choices=sorted(KINDS),
                   help="needles: fact (a magic number for a word) and/or passkey (SmolLM2-135M finds the passkey "
                        "only in 1 of 6 dense examples of 2-4k tokens, the fact in 5 of 6)")


def run(ev: Any, args: argparse.Namespace, calibration_stream: Optional[Sequence[int]],
        tick: Callable[[], None] = lambda: None) -> List[Dict[str, Any]]:
    """The retrieval records of an ``evaluate`` run: dense, then every policy at every budget (in context; the
    gates' threshold and the baselines' ratios set per example length on windows of ``calibration_stream``, the
    calibration text), or at every ratio when no budget is given."""
    from ..training.data import read_text_documents
    from . import equal_bytes
    from .perplexity import token_windows

    tok = ev.tokenizer
    filler = tok("\n\n".join(read_text_documents(args.retrieval_text)), add_special_tokens=False)["input_ids"]
    examples = make_examples(tok, filler, args.retrieval_lengths, args.retrieval_depths, args.retrieval_per_cell,
                             args.retrieval_kinds, args.seed)
    has_gates = ev.trained_gates is not None
    records = [{"task": "retrieval", "policy": "dense", "mode": "dense",
                **score(lambda ids, c: ev.continuation_logits(ids, c, "dense", "dense", 0.0), examples,
                        args.batch_size, tick)}]
    native = None if not has_gates else {k: v.clone() for k, v in ev.trained_gates.items()}
    targets = [("share", b) for b in args.budgets] or [("ratio", r) for r in args.ratios]
    for kind, target in targets:
        for policy in args.policies:
            if policy == "gate" and not has_gates:
                continue
            results = []
            for length in sorted({ex.length for ex in examples}):
                subset = [ex for ex in examples if ex.length == length]
                if native is not None:
                    ev.trained_gates = {k: v.clone() for k, v in native.items()}
                calibration = token_windows(calibration_stream or filler, length, args.calibration_windows,
                                            spread=True)
                if kind == "share":
                    setting = equal_bytes.settle(ev, policy, target, calibration, args.calibration_windows)
                    ratio = setting["ratio"]
                else:
                    ratio = target
                    if policy == "gate":
                        ev.calibrate(ratio, calibration[: args.calibration_windows])
                results.append((subset, ratio, score(
                    lambda ids, c: ev.continuation_logits(ids, c, policy, "in_context", ratio), subset,
                    args.batch_size, tick)))
            records.append(_merge(policy, kind, target, results))
    if native is not None:
        ev.trained_gates = native
    return records


def _merge(policy: str, kind: str, target: float, parts: List[Tuple[List[RetrievalExample], float, Dict[str, Any]]]
           ) -> Dict[str, Any]:
    """One record from the per-length scores of a (policy, target)."""
    total = sum(len(subset) for subset, _, _ in parts)
    record: Dict[str, Any] = {"task": "retrieval", "policy": policy, "mode": "in_context",
                              ("target_share" if kind == "share" else "target_eviction"): target,
                              "examples": total, "by_length": {}, "ratio_by_length": {}}
    for key in ("accuracy", "eviction_ratio", "held_share"):
        record[key] = sum(s[key] * len(subset) for subset, _, s in parts) / total
    depths: Dict[str, List[float]] = {}
    for subset, ratio, s in parts:
        record["by_length"].update(s["by_length"])
        record["ratio_by_length"][str(subset[0].length)] = ratio
        for depth, acc in s["by_depth"].items():
            depths.setdefault(depth, []).append(acc * len(subset))
    record["by_depth"] = {d: sum(v) / total for d, v in depths.items()}
    return record


def retrieval_table(records: List[Dict[str, Any]]) -> str:
    """Markdown: accuracy per policy and budget (eviction needed / held share in brackets)."""
    targets = sorted({r.get("target_share", r.get("target_eviction")) for r in records if r["policy"] != "dense"},
                     reverse=True)
    key = "target_share" if any("target_share" in r for r in records) else "target_eviction"
    label = "of dense bytes" if key == "target_share" else "eviction"
    lines = ["| policy | " + " | ".join(f"{t:.2f} {label}: accuracy (evicted / held)" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for r in records:
        if r["policy"] == "dense":
            lines.append("| dense | " + " | ".join(f"{r['accuracy']:.3f}" for _ in targets) + " |")
    for policy in dict.fromkeys(r["policy"] for r in records if r["policy"] != "dense"):
        cells = []
        for t in targets:
            r = next((r for r in records if r["policy"] == policy and r.get(key) == t), None)
            cells.append("-" if r is None else
                         f"{r['accuracy']:.3f} ({r['eviction_ratio']:.2f} / {r['held_share']:.2f})")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
