"""Every policy at the same held-byte budgets (``python -m attngate_ext.evaluate --budgets 0.5 0.25``).

For each budget (a fraction of the bytes a dense cache holds for the same tokens) and policy:

* the trained gates: one global threshold is set on the calibration windows so that a cache holds the budget
  (:func:`attngate_ext.evaluation.budget.calibrate_gate_bytes`); the window ring, the gates' own K'/V' and page
  rounding count against them. With ``--gate-window-choices`` their window is chosen per budget and length
  (:func:`attngate_ext.evaluation.budget.window_for_budget`);
* a baseline: the eviction ratio at which it holds the budget, measured on one calibration window (its bytes
  depend on the length only) (:func:`attngate_ext.evaluation.budget.ratio_for_share`);

then the evaluation windows are scored in context, and each record carries what the cache measured there: the held
share, the eviction it needed, and the bytes allocated (free pool pages and page tables too).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from .budget import ratio_for_share, window_for_budget

BUDGET_MODE = "in_context"


def budget_tasks(policies: Sequence[str], budgets: Sequence[float], has_gates: bool) -> List[Tuple[str, float]]:
    """``(policy, budget)`` pairs to evaluate (the gates only when there are trained gates)."""
    return [(policy, share) for share in budgets for policy in policies if policy != "gate" or has_gates]


def settle(ev: Any, policy: str, share: float, calibration: torch.Tensor, windows: int) -> Dict[str, Any]:
    """Sets ``policy`` to hold ``share`` of the dense bytes on the calibration windows; returns what the record
    needs: ``ratio`` (the eviction ratio to evaluate a baseline at; for the gates the ratio their threshold gave
    on the calibration text), ``calibration_share``, and for the gates ``shift`` and ``reachable``."""
    if policy == "gate":
        choices = getattr(ev.args, "gate_window_choices", None)
        if choices:
            ev.set_gate_window(window_for_budget(share, calibration.shape[1], choices))
        result = ev.calibrate_bytes(share, calibration[:windows])
        return {"ratio": result["eviction_ratio"], "calibration_share": result["held_share"],
                "shift": result["shift"], "reachable": result["reachable"],
                "protect_recent": ev.base_config.protect_recent}

    one = calibration[:1]
    result = ratio_for_share(lambda ratio: ev.held_share(policy, ratio, one), share)
    return {"ratio": result["ratio"], "calibration_share": result["held_share"],
            "reachable": result["held_share"] <= share + 0.01}


def run_budgets(ev: Any, tasks: List[Tuple[str, float]], windows: torch.Tensor, calibration: torch.Tensor,
                calibration_windows: int, perplexity: Callable[..., Dict[str, Any]],
                tick: Callable[[], None] = lambda: None) -> List[Dict[str, Any]]:
    """Evaluates every ``(policy, budget)``; ``perplexity(ev, windows, policy, mode, ratio, tick)`` scores the
    windows (the gates at the threshold :func:`settle` left them at). Returns one record per task."""
    native = None if ev.trained_gates is None else {k: v.clone() for k, v in ev.trained_gates.items()}
    records = []
    for policy, share in tasks:
        if policy == "gate":
            ev.trained_gates = {k: v.clone() for k, v in native.items()}
        setting = settle(ev, policy, share, calibration, calibration_windows)
        tick()
        record = {"policy": policy, "mode": BUDGET_MODE, "target_share": share, "target_eviction": setting["ratio"],
                  **{k: v for k, v in setting.items() if k != "ratio"}}
        record.update(perplexity(ev, windows, policy, BUDGET_MODE, setting["ratio"], tick))
        records.append(record)
    if native is not None:
        ev.trained_gates = native
    return records


def budget_table(results: List[Dict[str, Any]]) -> str:
    """Markdown: one row per policy, per budget ``perplexity / eviction needed / held share``."""
    budgets = sorted({r["target_share"] for r in results if "target_share" in r}, reverse=True)
    dense = next((r for r in results if r["policy"] == "dense"), None)
    lines = ["| policy | " + " | ".join(f"{b:.2f} of dense: ppl / evicted / held" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    if dense is not None and "perplexity" in dense:
        lines.append("| dense | " + " | ".join(f"{dense['perplexity']:.2f} / 0 / 1.00" for _ in budgets) + " |")
    policies = []
    for r in results:
        if "target_share" in r and r["policy"] not in policies:
            policies.append(r["policy"])
    for policy in policies:
        cells = []
        for b in budgets:
            r = next((r for r in results if r["policy"] == policy and r.get("target_share") == b), None)
            if r is None or "perplexity" not in r:
                cells.append("-")
                continue
            flag = "" if r.get("reachable", True) else " (budget out of reach)"
            cells.append(f"{r['perplexity']:.2f} / {r['eviction_ratio']:.3f} / {r['held_share']:.3f}{flag}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
