"""Quality against eviction for the dense model, the trained gates and the baseline policies, on one machinery.

    python -m attngate_ext.evaluate --model DIR --gates runs/gates/gates --text heldout/*.txt \\
        --ratios 0.25 0.5 0.75 --out eval.json --plots eval_plots/

Perplexity protocol: non-overlapping windows of ``--context-len + --continuation-len`` tokens; the loss is the
next-token NLL of the continuation tokens only, so both modes are compared on the same targets:

* ``in_context``: the whole window is one prefill through an :class:`AttnGateCache`; tokens are evicted as they
  are created (the trained gates, biases shifted per head to each target ratio on ``--calibration-text``; or a
  baseline's creation-time form), so the continuation is read with what the policy kept.
* ``post_prefill``: the context is prefilled with every token cached, pruned in place to the budget
  (``paged_compact_kv_``, as kvpress does), then the continuation is forwarded through the pruned cache.

Multiple choice (``--mc`` JSONL ``{"context", "choices", "label"}``): each choice is scored by its log-likelihood
after the context under the same policy and mode; accuracy is the fraction where the best choice is the label.
Each result carries the measured eviction ratio and KV bytes. Results: JSON (``--out``), a table, and with
``--plots DIR`` three PNGs (quality vs eviction, the gates' retention per layer x KV head, a token-by-head keep map).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..cache.cache import AttnGateCache
from ..gate.config import AttentionGateConfig
from ..models.calibration import calibrate_gate_threshold, set_constant_gates
from ..models.decoder import cache_kwarg
from ..models.gate_files import load_gates
from ..models.layer_inputs import recording_layer_inputs
from ..models.model import add_attention_gates, gate_config, gated_layers, update_gate_config
from ..training import utils
from ..training.data import read_text_documents
from . import equal_bytes, retrieval
from .in_context import use_in_context_policy
from .perplexity import token_windows
from .policies import POLICIES, Policy
from .post_prefill import prune_cache

MODES = ("in_context", "post_prefill")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m attngate_ext.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=utils.HelpWithDefaults)
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--gates", help="trained gates (save_gates directory); default: the gates shipped with the package "
                                   "for this model (attngate_ext.list_pretrained_gates()) if there are any")
    p.add_argument("--no-gates", action="store_true", help="evaluate the baselines only (no 'gate' policy)")
    p.add_argument("--text", nargs="+", help="held-out text files/directories for perplexity")
    p.add_argument("--mc", help="JSONL of {context, choices, label} for multiple-choice accuracy")
    p.add_argument("--calibration-text", nargs="+",
                   help="text to set the gates' threshold per ratio (default --text; use other text of the same "
                        "domain, never the evaluation windows, for an honest number)")
    p.add_argument("--calibration-windows", type=int, default=4,
                   help="windows of --calibration-text used to set the threshold")
    p.add_argument("--calibration", choices=["global", "per_head"], default="global",
                   help="global: one threshold for every gate (heads keep the different fractions they learned); "
                        "per_head: every (layer, KV head) evicts the ratio. Either way the ratio is "
                        "the one the cache measures at the end of a window, recent-window tokens included")
    p.add_argument("--gate-window", type=int, default=None,
                   help="evaluate the gates with this protect_recent w instead of the one they were trained with")
    p.add_argument("--gate-window-choices", nargs="+", type=int, default=None,
                   help="at each byte budget (--budgets) the gates use the largest of these windows that is at "
                        "most half the rows the budget holds per head, else the smallest (overrides --gate-window "
                        "there)")
    p.add_argument("--gate-attention-window", type=int, default=None,
                   help="evaluate the gates with this attention_window of their own attention (0: every token)")
    p.add_argument("--policies", nargs="+", default=["gate", *POLICIES], choices=["gate", *POLICIES],
                   help="eviction policies to compare with the dense model")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference (e.g. already measured)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="when the policies evict: while the window is prefilled, or after the context")
    p.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5, 0.75],
                   help="target eviction ratios, each in [0, 1) (none: only --budgets)")
    p.add_argument("--budgets", nargs="+", type=float, default=[],
                   help="also compare every policy at these held-byte budgets, fractions of a dense cache's bytes "
                        "(e.g. 0.5 0.25), in context: the gates' threshold and each baseline's ratio are set on "
                        "--calibration-text so that the cache holds the budget (window ring, the gates' K'/V' and "
                        "page rounding included)")
    p.add_argument("--context-len", type=int, default=256, help="context tokens per window")
    p.add_argument("--continuation-len", type=int, default=256,
                   help="continuation tokens per window (the perplexity is measured on them)")
    p.add_argument("--windows", type=int, default=8,
                   help="evaluation windows, evenly spaced over the text (see --first-windows)")
    p.add_argument("--first-windows", action="store_true",
                   help="take the first --windows windows of the text instead of evenly spaced ones")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--page-size", type=int, default=16,
                   help="rows per page of the gated cache; smaller pages waste less on short windows")
    p.add_argument("--dtype", choices=list(utils.DTYPES), default="float32", help="dtype of the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to evaluate on (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the random policy)")
    p.add_argument("--out", default="eval.json", help="results JSON (default eval.json)")
    p.add_argument("--plots", help="directory for the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    retrieval.add_arguments(p)
    args = p.parse_args(argv)
    if not args.text and not args.mc and not args.retrieval_text:
        p.error("give --text (perplexity), --mc (multiple choice) and/or --retrieval-text (needle retrieval)")
    if any(not 0.0 <= r < 1.0 for r in args.ratios):
        p.error("--ratios must lie in [0, 1)")
    if any(not 0.0 < b <= 1.0 for b in args.budgets):
        p.error("--budgets must lie in (0, 1]")
    if args.gate_window_choices is not None and min(args.gate_window_choices) < 1:
        p.error("--gate-window-choices must be >= 1")
    if args.context_len < 2 or args.continuation_len < 1:
        p.error("--context-len must be >= 2 and --continuation-len >= 1")
    utils.require(p, args, [*((name, utils.at_least_one, ">= 1")
                              for name in ("windows", "batch_size", "page_size", "calibration_windows",
                                           "retrieval_per_cell", "gate_window")),
                            ("gate_attention_window", lambda x: x >= 0, ">= 0")])
    return args


class Evaluator:
    """Holds the model in its three shapes (dense, gated with trained gates, gated with keep-all gates)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model, self.tokenizer = utils.load_local_model(args.model, args.dtype, args.device)
        self.model.eval()
        self.trained_gates = None
        self.gates_source = None if args.no_gates else args.gates
        if args.gates is None and not args.no_gates:
            from ..pretrained import matching_pretrained_gates, pretrained_gates

            name = matching_pretrained_gates(self.model)
            if name is not None:
                self.gates_source = pretrained_gates(name)
                print(f"gate policy: the shipped gates {name!r}")
        if self.gates_source:
            load_gates(self.model, self.gates_source)
            if args.gate_window is not None:
                update_gate_config(self.model, protect_recent=args.gate_window)
            if args.gate_attention_window is not None:
                update_gate_config(self.model, attention_window=args.gate_attention_window)
            self.trained_gates = {k: v.clone() for k, v in self.model.state_dict().items() if ".gate." in k}
        else:
            add_attention_gates(self.model, AttentionGateConfig(decode_gating=False))
        self.base_config = gate_config(self.model)

    # -- model shapes ------------------------------------------------------------------------------------------

    def _reset(self, policy: Optional[Policy], ratio: float = 0.0, length: int = 0) -> None:
        """Trained gates and their config back (or keep-all gates), with ``policy``'s creation-time flags if given."""
        if self.trained_gates is not None:
            self.model.load_state_dict(self.trained_gates, strict=False)
        else:
            set_constant_gates(self.model, keep=True)
        for attn in gated_layers(self.model):
            attn.gate.config = self.base_config
        use_in_context_policy(self.model, policy, ratio, length)

    def _keep_all(self) -> None:
        """Every token cached (w = 1, no sinks) and no gate K'/V' cache: the dense prefill of post-prefill pruning."""
        self._reset(None)
        set_constant_gates(self.model, keep=True)
        config = dataclasses.replace(self.base_config, protect_recent=1, sink_tokens=0, decode_gating=False)
        for attn in gated_layers(self.model):
            attn.gate.config = config

    def _cache_kwargs(self, cache) -> Dict[str, Any]:
        return {"use_cache": True, cache_kwarg(self.model): cache}

    # -- scoring -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def continuation_logprobs(self, ids: torch.Tensor, context: int, policy: str, mode: str,
                              ratio: float) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Log-probabilities ``(B, T - context)`` of tokens ``context..T-1`` of ``ids`` and the cache report."""
        logits, report = self.continuation_logits(ids, context, policy, mode, ratio)
        targets = ids[:, context:].to(logits.device).unsqueeze(-1)
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets).squeeze(-1), report

    @torch.no_grad()
    def continuation_logits(self, ids: torch.Tensor, context: int, policy: str, mode: str,
                            ratio: float) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The logits ``(B, T - context, V)`` that predict tokens ``context..T-1`` of ``ids`` under ``policy``
        (``"dense"``, ``"gate"`` or a baseline) in ``mode``, and the cache report."""
        ids = ids.to(self.args.device)
        T = ids.shape[1]
        report: Dict[str, Any] = {"eviction_ratio": 0.0, "kv_bytes": None, "dense_bytes": None}
        if policy == "dense":
            self._keep_all()
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=T - context + 1).logits[:, :-1]
        elif mode == "in_context":
            if policy == "gate":
                self._reset(None)
            else:
                self._reset(POLICIES[policy](), ratio, T)
            cache = AttnGateCache(self.args.page_size)
            logits = self.model(input_ids=ids, logits_to_keep=T - context + 1,
                                **self._cache_kwargs(cache)).logits[:, :-1]
            report = _report(cache)
        else:  # post_prefill
            self._keep_all()
            cache = AttnGateCache(self.args.page_size)
            with recording_layer_inputs(self.model) as inputs:
                first = self.model(input_ids=ids[:, :context], **self._cache_kwargs(cache)).logits[:, -1:]
            prune_cache(self.model, cache, POLICIES[policy](), ratio, inputs)
            report = _report(cache)
            logits = first
            if T - 1 > context:
                rest = self.model(input_ids=ids[:, context : T - 1], **self._cache_kwargs(cache)).logits
                logits = torch.cat([first, rest], dim=1)
        return logits, report

    def calibrate_bytes(self, share: float, ids: torch.Tensor) -> Dict[str, Any]:
        """Shifts the trained gates' biases (one global threshold) so that a cache filled with the calibration
        windows ``ids`` holds ``share`` of the dense bytes (:func:`budget.calibrate_gate_bytes`)."""
        from .budget import calibrate_gate_bytes, prefill_report

        self._reset(None)
        ids = ids.to(self.args.device)
        result = calibrate_gate_bytes(self.model, ids, share, page_size=self.args.page_size)
        if self.args.calibration == "per_head":  # the same eviction, but every (layer, KV head) evicts it alone
            self._reset(None)
            calibrate_gate_threshold(self.model, ids, result["eviction_ratio"], per_head=True)
            report = prefill_report(self.model, ids, page_size=self.args.page_size)
            result.update(held_share=report["held_share"], eviction_ratio=report["eviction_ratio"])
        self.trained_gates = {k: v.clone() for k, v in self.model.state_dict().items() if ".gate." in k}
        return result

    def set_gate_window(self, window: int) -> None:
        """Makes the trained gates use the window ``protect_recent = window`` from now on."""
        update_gate_config(self.model, protect_recent=window)
        self.base_config = gate_config(self.model)

    def held_share(self, policy: str, ratio: float, ids: torch.Tensor) -> float:
        """The held-byte share of a cache filled with ``ids`` under a baseline ``policy`` evicting ``ratio``."""
        from .budget import prefill_report

        self._reset(POLICIES[policy](), ratio, ids.shape[1])
        return prefill_report(self.model, ids.to(self.args.device), page_size=self.args.page_size)["held_share"]

    def calibrate(self, ratio: float, ids: torch.Tensor) -> float:
        """Shifts the trained gates' biases so that a cache evicts ``ratio`` of the calibration windows (as measured
        at their end); returns that measured ratio."""
        self._reset(None)
        measured = calibrate_gate_threshold(self.model, ids.to(self.args.device), ratio,
                                            per_head=self.args.calibration == "per_head")
        self.trained_gates = {k: v.clone() for k, v in self.model.state_dict().items() if ".gate." in k}
        return measured


def _report(cache) -> Dict[str, Any]:
    r = cache.memory_report()
    return {"eviction_ratio": r.eviction_ratio, "kv_bytes": r.held_bytes, "dense_bytes": r.dense_bytes,
            "allocated_bytes": r.allocated_bytes, "gate_bytes": r.gate_bytes, "rounding_bytes": r.rounding_bytes,
            "retention_per_head": r.retention_per_head}


def _tasks(args: argparse.Namespace, has_gates: bool) -> List[Tuple[str, str, float]]:
    tasks = [] if getattr(args, "no_dense", False) else [("dense", "dense", 0.0)]
    for policy in args.policies:
        if policy == "gate" and not has_gates:
            continue
        for mode in args.modes:
            if policy == "gate" and mode == "post_prefill":
                continue  # the gates decide in context by construction
            tasks.extend((policy, mode, ratio) for ratio in args.ratios)
    return tasks


def _mc_records(path: str) -> List[Dict[str, Any]]:
    records = []
    for number, r in utils.read_jsonl(path):
        if not {"context", "choices", "label"} <= set(r):
            raise ValueError(f"{path}:{number}: need context, choices and a label indexing the choices")
        if not isinstance(r["context"], str) or not isinstance(r["choices"], list) or not r["choices"] or not all(
                isinstance(c, str) for c in r["choices"]):
            raise ValueError(f"{path}:{number}: context must be a string and choices a non-empty list of strings")
        if isinstance(r["label"], bool) or not isinstance(r["label"], int) or not 0 <= r["label"] < len(r["choices"]):
            raise ValueError(f"{path}:{number}: label must be an integer index into the {len(r['choices'])} choices, "
                             f"got {r['label']!r}")
        records.append(r)
    if not records:
        raise ValueError(f"no multiple-choice records in {path!r}")
    return records


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluates every (policy, mode, ratio) and returns ``{"results": [...], ...}`` (also written to --out)."""
    torch.manual_seed(args.seed)
    ev = Evaluator(args)
    tok = ev.tokenizer
    windows = None
    if args.text:
        stream = tok("\n\n".join(read_text_documents(args.text)))["input_ids"]
        windows = token_windows(stream, args.context_len + args.continuation_len, args.windows,
                                spread=not args.first_windows)
    calibration = windows
    calibration_stream = None
    if args.calibration_text:
        calibration_stream = tok("\n\n".join(read_text_documents(args.calibration_text)))["input_ids"]
        calibration = token_windows(calibration_stream, args.context_len + args.continuation_len,
                                    args.calibration_windows, spread=True)
    mc = _mc_records(args.mc) if args.mc else []
    tasks = _tasks(args, ev.trained_gates is not None) if windows is not None or mc else []
    budgets = equal_bytes.budget_tasks(args.policies, args.budgets, ev.trained_gates is not None)
    if windows is None:
        budgets = []  # no perplexity windows: the budgets apply to the other tasks
    native = ({k: v.clone() for k, v in ev.trained_gates.items()} if ev.trained_gates is not None else None)
    # The bar counts forwards (a calibration, a batch of windows, a multiple-choice record), so a slow row moves too.
    batches = 0 if windows is None else math.ceil(windows.shape[0] / args.batch_size)
    units = sum(batches + len(mc) + (policy == "gate") for policy, _, _ in tasks) + len(budgets) * (batches + 1)
    progress = None if args.no_progress else _bar(units)
    tick = (lambda: None) if progress is None else (lambda: progress.update(1))
    results = []
    for policy, mode, ratio in tasks:
        if progress is not None:
            progress.set_postfix_str(f"{policy}/{mode}/{ratio}")
        if policy == "gate":
            ev.trained_gates = {k: v.clone() for k, v in native.items()}
            if calibration is None:
                raise ValueError("the gate policy needs --text or --calibration-text to calibrate its biases")
            calibrated = ev.calibrate(ratio, calibration[: args.calibration_windows])
            tick()
        record: Dict[str, Any] = {"policy": policy, "mode": mode, "target_eviction": ratio}
        if policy == "gate":
            record["calibration_eviction"] = calibrated
        if windows is not None:
            record.update(_perplexity(ev, windows, policy, mode, ratio, tick))
        if mc:
            record.update(_accuracy(ev, mc, policy, mode, ratio, tick))
            record.setdefault("eviction_ratio", record["mc_eviction_ratio"])
        results.append(record)
    if native is not None:
        ev.trained_gates = native
    if budgets:
        results += equal_bytes.run_budgets(ev, budgets, windows, calibration, args.calibration_windows, _perplexity,
                                           tick)
    retrieval_records = (retrieval.run(ev, args, calibration_stream, tick) if args.retrieval_text else [])
    if progress is not None:
        progress.close()
    output = {"results": results, "protocol": {"context_len": args.context_len,
                                               "continuation_len": args.continuation_len,
                                               "windows": 0 if windows is None else int(windows.shape[0]),
                                               "mc_records": len(mc), "calibration": args.calibration,
                                               "page_size": args.page_size,
                                               "gates": ev.gates_source,
                                               "gate_config": ev.base_config.to_dict()}}
    if retrieval_records:
        output["retrieval"] = retrieval_records
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(output, indent=2))
    print_table([r for r in results if "target_share" not in r])
    if budgets:
        print("\nat equal held bytes (in context):\n" + equal_bytes.budget_table(results))
    if retrieval_records:
        print("\nretrieval (exact match):\n" + retrieval.retrieval_table(retrieval_records))
    if args.plots:  # after the results are safe on disk
        output["plots"] = _plots(ev, args, results, windows) if results else []
        if retrieval_records and args.budgets:
            from .plots import plot_quality_vs_bytes

            output["plots"].append(plot_quality_vs_bytes(retrieval_records, str(Path(args.plots) / "retrieval_vs_held_bytes.png"),
                                                         metric="accuracy", title="retrieval accuracy vs bytes held"))
        Path(args.out).write_text(json.dumps(output, indent=2))
    print(f"results: {args.out}" + (f"; plots: {', '.join(output['plots'])}" if args.plots else ""), flush=True)
    return output


def _perplexity(ev: Evaluator, windows: torch.Tensor, policy: str, mode: str, ratio: float,
                tick: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    nll, count, ratio_sum, kv, dense = 0.0, 0, 0.0, 0, 0
    shares = {"held_share": 0.0, "allocated_share": 0.0, "gate_share": 0.0, "rounding_share": 0.0}
    retention = None
    for start in range(0, windows.shape[0], ev.args.batch_size):
        batch = windows[start : start + ev.args.batch_size]
        logprobs, report = ev.continuation_logprobs(batch, ev.args.context_len, policy, mode, ratio)
        nll -= float(logprobs.sum())
        count += logprobs.numel()
        ratio_sum += report["eviction_ratio"] * batch.shape[0]
        kv = max(kv, report["kv_bytes"] or 0)
        dense = max(dense, report["dense_bytes"] or 0)
        for name, key in (("held_share", "kv_bytes"), ("allocated_share", "allocated_bytes"),
                          ("gate_share", "gate_bytes"), ("rounding_share", "rounding_bytes")):
            part = report[key] / report["dense_bytes"] if report["dense_bytes"] else float(name in ("held_share",
                                                                                                   "allocated_share"))
            shares[name] += part * batch.shape[0]
        if policy == "gate":  # the kept fraction per (layer, KV head): the budgets the gates give each head
            per_head = torch.tensor(report["retention_per_head"]) * batch.shape[0]
            retention = per_head if retention is None else retention + per_head
        tick()
    # Eviction: measured by the cache at the end of each batch (in context: end of the window; post-prefill: right
    # after pruning the context). KV share: the largest batch's held bytes (pages held, the window ring and the gates'
    # K'/V') over its dense cache.
    # held_share / allocated_share / gate_share: means over the windows of each batch's bytes over its dense cache
    # (allocated: also the free pool pages and the page tables).
    return {"perplexity": math.exp(nll / count), "eviction_ratio": ratio_sum / windows.shape[0],
            "kv_bytes": kv or None, "kv_share": kv / dense if dense else 1.0,
            **{k: v / windows.shape[0] for k, v in shares.items()},
            **({} if retention is None else {"retention_per_head": (retention / windows.shape[0]).tolist()})}


def _accuracy(ev: Evaluator, records: List[Dict[str, Any]], policy: str, mode: str, ratio: float,
              tick: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    tok = ev.tokenizer
    correct, ratios = 0, []
    for record in records:
        context = tok(record["context"])["input_ids"]
        scores = []
        for choice in record["choices"]:
            ids = torch.tensor([context + tok(choice, add_special_tokens=False)["input_ids"]])
            logprobs, report = ev.continuation_logprobs(ids, len(context), policy, mode, ratio)
            scores.append(float(logprobs.sum()))
            ratios.append(report["eviction_ratio"])
        correct += int(max(range(len(scores)), key=scores.__getitem__) == int(record["label"]))
        tick()
    return {"accuracy": correct / len(records), "mc_eviction_ratio": sum(ratios) / len(ratios)}


def _plots(ev: Evaluator, args: argparse.Namespace, results: List[Dict[str, Any]],
           windows: Optional[torch.Tensor]) -> List[str]:
    from . import plots

    out = Path(args.plots)
    paths = []
    metric = "perplexity" if windows is not None else "accuracy"
    by_ratio = [r for r in results if "target_share" not in r]
    by_bytes = [r for r in results if "target_share" in r or r["policy"] == "dense"]
    if by_ratio and (len(by_ratio) > 1 or len(by_bytes) <= 1):
        paths.append(plots.plot_quality_vs_eviction(by_ratio, str(out / f"{metric}_vs_eviction.png"), metric=metric))
    if len(by_bytes) > 1 and windows is not None:
        paths.append(plots.plot_quality_vs_bytes(by_bytes, str(out / "perplexity_vs_held_bytes.png")))
    if ev.trained_gates is not None and windows is not None:
        ev._reset(None)
        with torch.no_grad():
            ev.model(input_ids=windows[:1].to(args.device), use_cache=False)
        keep = torch.stack([attn.last_gate.keep[0] for attn in gated_layers(ev.model)]).cpu()  # (L, H, T)
        retention = keep.float().mean(dim=-1).tolist()
        paths.append(plots.plot_retention_heatmap(retention, str(out / "gate_retention.png"),
                                                  title="trained gates: kept fraction (layer x KV head)"))
        tokens = [ev.tokenizer.decode([t]) for t in windows[0, :64].tolist()]
        paths.append(plots.plot_keep_map(keep[..., :64], str(out / "keep_map.png"), tokens=tokens,
                                         title="trained gates: kept (dark) per token and (layer, KV head)"))
    return paths


def print_table(results: List[Dict[str, Any]]) -> None:
    print(f"\n{'policy':<14} {'mode':<13} {'target':>6} {'evicted':>8} {'perplexity':>11} {'accuracy':>9} "
          f"{'KV share':>9}")
    for r in results:
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        share = f"{r['kv_share']:.3f}" if "kv_share" in r else "-"
        print(f"{r['policy']:<14} {r['mode']:<13} {r['target_eviction']:>6.2f} {r.get('eviction_ratio', 0):>8.3f} "
              f"{ppl:>11} {acc:>9} {share:>9}")


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", dynamic_ncols=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
