"""Any lm-evaluation-harness task on a gated model, under a chosen eviction policy (``pip install .[eval]``).

    from attngate_ext.evaluation.lm_eval import evaluate_tasks, gated_lm

    model = AutoModelForCausalLM.from_pretrained(DIR); tokenizer = AutoTokenizer.from_pretrained(DIR)
    lm = gated_lm(model, tokenizer, "gate", ratio=0.5)          # the shipped gates, set to evict 50%
    out = evaluate_tasks(lm, ["niah_single_1"], limit=20, metadata={"pretrained": DIR})
    print(out["results"]["niah_single_1"], out["eviction"]["niah_single_1"])

:func:`gated_lm` installs the policy (:func:`~.eviction_setup.install_policy`: dense, the trained gates at a
threshold or a calibrated ratio, or a baseline such as H2O at a ratio or a budget; optionally a hard budget of
tokens per KV head, ``max_tokens_per_head``) and wraps the model in a
``GatedHFLM`` (``attngate_ext/evaluation/lm_eval_model.py``): the harness's own ``HFLM``, whose forwards
(log-likelihood tasks) and ``generate`` calls (``generate_until`` tasks) go through a fresh ``AttnGateCache``, so
eviction happens in context and while generating, and every cache's memory report is tallied.
:func:`evaluate_tasks` runs ``lm_eval.simple_evaluate`` once per task and returns the harness's results with the
eviction measured on each task. The command line is ``python -m attngate_ext.lm_eval`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..training import utils
from .eviction_setup import POLICY_NAMES, install_policy

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'attngate_ext[eval]' (or pip install lm-eval)"


def gated_lm(model: nn.Module, tokenizer: Any, policy: str = "gate", *, gates: Optional[str] = None,
             ratio: Optional[float] = None, budget: Optional[int] = None, threshold: Optional[float] = None,
             calibration_ids: Optional[torch.Tensor] = None, per_head: bool = False,
             gate_window: Optional[int] = None, max_tokens_per_head: Optional[int] = None,
             prefill_chunk: Optional[int] = None, page_size: int = 16, batch_size: int = 1, **hflm_kwargs: Any):
    """``model`` (modified in place: gates added or loaded) under ``policy``, wrapped for the harness.

    ``policy``: ``"dense"``, ``"gate"`` or a baseline (``"h2o"``, ``"snapkv"``, ``"window"``,
    ``"streaming_llm"``, ``"random"``); ``gates``, ``ratio``, ``budget``, ``threshold``, ``calibration_ids``,
    ``per_head``, ``gate_window``, ``max_tokens_per_head`` (a hard budget of every cache) and ``prefill_chunk`` as in
    :func:`~.eviction_setup.install_policy`. ``page_size``: rows per page of
    the caches. ``batch_size`` and ``hflm_kwargs`` go to ``HFLM`` (e.g. ``max_length``). Returns a ``GatedHFLM``
    (an ``lm_eval`` ``HFLM``; its ``eviction_report()`` holds what the caches measured).
    """
    try:
        from .lm_eval_model import GatedHFLM
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    model.eval()
    installed = install_policy(model, policy, gates=gates, ratio=ratio, budget=budget, threshold=threshold,
                               calibration_ids=calibration_ids, per_head=per_head, gate_window=gate_window,
                               max_tokens_per_head=max_tokens_per_head, prefill_chunk=prefill_chunk)
    return GatedHFLM(model, installed, page_size=page_size, tokenizer=tokenizer, batch_size=batch_size,
                     **hflm_kwargs)


def evaluate_tasks(lm: Any, tasks: Sequence[str], *, limit: Optional[float] = None,
                   include_path: Optional[str] = None, include_defaults: bool = True,
                   metadata: Optional[Dict[str, Any]] = None, **simple_evaluate_kwargs: Any) -> Dict[str, Any]:
    """Runs each task with ``lm_eval.simple_evaluate(model=lm, tasks=[task], ...)`` and returns
    ``{"results": {task: metrics}, "eviction": {task: lm.eviction_report()}, "seconds": {task: s}, "raw": {task:
    the harness's whole output}}``.

    ``limit``: documents per task (a fraction when below 1); ``include_path``: a directory of extra task YAMLs
    (``include_defaults=False``: only those, which skips indexing the harness's thousands of tasks);
    ``metadata``: what the harness hands to tasks (RULER's need ``{"pretrained": tokenizer directory}`` to size
    their prompts, and take ``max_seq_lengths``); the other keywords go to ``simple_evaluate`` (here
    ``bootstrap_iters`` defaults to 0, no standard errors, which long tasks would pay for, and ``log_samples`` to
    False).
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults, metadata=metadata)
    simple_evaluate_kwargs.setdefault("bootstrap_iters", 0)
    simple_evaluate_kwargs.setdefault("log_samples", False)
    out: Dict[str, Any] = {"results": {}, "eviction": {}, "seconds": {}, "raw": {}}
    for task in tasks:
        if hasattr(lm, "reset_eviction"):
            lm.reset_eviction()
        start = time.perf_counter()
        raw = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager,
                                      **simple_evaluate_kwargs)
        out["seconds"][task] = time.perf_counter() - start
        out["raw"][task] = raw
        out["results"].update(raw["results"])
        if hasattr(lm, "eviction_report"):
            out["eviction"][task] = lm.eviction_report()
    return out


# -- the command line ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m attngate_ext.lm_eval", description=__doc__.split("\n\n")[0],
                                formatter_class=utils.HelpWithDefaults)
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names (each run on its own)")
    p.add_argument("--policy", choices=POLICY_NAMES, default="gate", help="eviction policy")
    p.add_argument("--ratio", type=float, help="target eviction ratio in [0, 1): the gates' threshold is set for it, "
                                               "a baseline evicts it from every input")
    p.add_argument("--budget", type=int, help="tokens each KV head keeps (baselines)")
    p.add_argument("--threshold", type=float, help="the gates' keep threshold (instead of --ratio)")
    p.add_argument("--gates", help="a shipped gates name or a save_gates directory; default: the gates shipped for "
                                   "this model (attngate_ext.list_pretrained_gates())")
    p.add_argument("--calibration-text", nargs="+",
                   help="text files/directories to set the gates' threshold for --ratio (default for shipped gates: "
                        "the shift stored with them)")
    p.add_argument("--calibration-windows", type=int, default=4, help="windows of --calibration-text")
    p.add_argument("--calibration-len", type=int, default=1024, help="tokens per calibration window")
    p.add_argument("--calibration", choices=["global", "per_head"], default="global",
                   help="one threshold for every gate, or every (layer, KV head) to the ratio")
    p.add_argument("--gate-window", type=int, help="the gates' protect_recent instead of the trained one")
    p.add_argument("--max-tokens-per-head", type=int,
                   help="hard budget: every cache holds each (layer, row, KV head) to at most this many tokens, the "
                        "lowest-scoring dropped (--policy gate, h2o or snapkv; h2o/snapkv may take it alone)")
    p.add_argument("--prefill-chunk", type=int,
                   help="the gates read a prompt in chunks of this many tokens (0: all at once; default: the "
                        "gates'), so --max-tokens-per-head also binds while a long prompt is read")
    p.add_argument("--limit", type=float, help="documents per task (a fraction when below 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--include-path", help="directory of extra task YAMLs")
    p.add_argument("--no-default-tasks", action="store_true",
                   help="only the tasks of --include-path (skips indexing the harness's own)")
    p.add_argument("--metadata", default="{}",
                   help="JSON handed to the tasks, e.g. '{\"max_seq_lengths\": [4096]}' for RULER; \"pretrained\" "
                        "defaults to --model (RULER's tasks size their prompts with its tokenizer)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward / generate")
    p.add_argument("--max-length", type=int, help="longest input (default: the model's)")
    p.add_argument("--page-size", type=int, default=16, help="rows per page of the caches")
    p.add_argument("--dtype", choices=list(utils.DTYPES), default="float32", help="dtype of the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the harness and of the random policy")
    p.add_argument("--out", help="results JSON")
    args = p.parse_args(argv)
    try:
        args.metadata = json.loads(args.metadata)
    except json.JSONDecodeError as error:
        p.error(f"--metadata is not JSON: {error}")
    if not isinstance(args.metadata, dict):
        p.error("--metadata must be a JSON object")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    utils.require(p, args, [(name, utils.at_least_one, ">= 1") for name in
                            ("batch_size", "page_size", "calibration_windows", "gate_window", "budget",
                             "max_tokens_per_head")])
    utils.require(p, args, [("prefill_chunk", lambda x: x >= 0, ">= 0")])
    return args


def _calibration_ids(args: argparse.Namespace, tokenizer: Any) -> Optional[torch.Tensor]:
    if not args.calibration_text:
        return None
    from ..training.data import read_text_documents
    from .perplexity import token_windows

    stream = tokenizer("\n\n".join(read_text_documents(args.calibration_text)))["input_ids"]
    return token_windows(stream, args.calibration_len, args.calibration_windows, spread=True)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Builds the gated model, evaluates every task, prints a table, writes ``--out``; returns the output."""
    torch.manual_seed(args.seed)
    model, tokenizer = utils.load_local_model(args.model, args.dtype, args.device)
    extra = {"max_length": args.max_length} if args.max_length else {}
    try:
        lm = gated_lm(model, tokenizer, args.policy, gates=args.gates, ratio=args.ratio, budget=args.budget,
                      threshold=args.threshold, calibration_ids=_calibration_ids(args, tokenizer),
                      per_head=args.calibration == "per_head", gate_window=args.gate_window,
                      max_tokens_per_head=args.max_tokens_per_head, prefill_chunk=args.prefill_chunk,
                      page_size=args.page_size, batch_size=args.batch_size, **extra)
    except ValueError as error:
        raise SystemExit(f"python -m attngate_ext.lm_eval: {error}") from None
    metadata = {"pretrained": args.model, **args.metadata}
    out = evaluate_tasks(lm, args.tasks, limit=args.limit, include_path=args.include_path,
                         include_defaults=not args.no_default_tasks, metadata=metadata,
                         num_fewshot=args.num_fewshot, random_seed=args.seed, numpy_random_seed=args.seed,
                         torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    summary = {"results": out["results"], "eviction": out["eviction"], "seconds": out["seconds"],
               "model": args.model, "limit": args.limit}
    print_table(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2, default=str))
        print(f"results: {args.out}")
    return summary


def metric_values(task_results: Dict[str, Any]) -> Dict[str, float]:
    """The numeric metrics of one task's harness results (``"acc,none": 0.5`` -> ``"acc": 0.5``; standard errors
    and the placeholders of unused RULER lengths, -1, left out)."""
    values = {}
    for key, value in task_results.items():
        name = key.split(",")[0]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in name and value != -1:
            values[name] = float(value)
    return values


def print_table(summary: Dict[str, Any]) -> None:
    """One row per task and metric: the value, the measured eviction and KV share, the task's seconds."""
    rows: List[str] = [f"{'task':<22} {'metric':<10} {'value':>8} {'evicted':>8} {'KV share':>9} {'seconds':>8}"]
    for task, seconds in summary["seconds"].items():
        eviction = summary["eviction"].get(task, {})
        tally = eviction.get("generate_until") or eviction.get("loglikelihood") or {}
        evicted = tally.get("eviction_ratio")
        share = tally.get("kv_share")
        for name, value in metric_values(summary["results"].get(task, {})).items():
            rows.append(f"{task:<22} {name:<10} {value:>8.4f} "
                        f"{'-' if evicted is None else f'{evicted:.3f}':>8} "
                        f"{'-' if share is None else f'{share:.3f}':>9} {seconds:>8.1f}")
    print("\n".join(rows))


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
