"""PNG plots for the evaluation: quality against eviction, per-head retention, and a token-by-head keep map.

matplotlib is optional: it is imported inside each function (non-interactive Agg canvas, no display needed), so
``import attngate_ext`` works without it and only calling a plot function asks for it.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["plot_quality_vs_eviction", "plot_quality_vs_bytes", "plot_retention_heatmap", "plot_keep_map"]

_DPI = 120


def _figure(figsize: Tuple[float, float]) -> Any:
    """A matplotlib Figure on an Agg canvas (never pyplot, so no global state and no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - only without matplotlib
        raise ImportError("attngate_ext.plots needs matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def _plain_text(s: str) -> str:
    """A token as a tick label: visible whitespace, and no '$' that matplotlib would read as mathtext."""
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    s = s.replace("$", r"\$")
    return s if s.strip() else repr(s)


def _number(value: Any) -> Optional[float]:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def plot_quality_vs_eviction(results: List[Dict[str, Any]], path: str, metric: str = "perplexity",
                             title: Optional[str] = None) -> str:
    """Plot ``metric`` against the measured eviction ratio, one line per (policy, mode); save a PNG.

    Args:
        results: records such as ``{"policy": "streaming_llm", "mode": "in_context", "target_eviction": 0.5,
            "eviction_ratio": 0.49, "perplexity": 42.1, "accuracy": 0.61}``. The x value is ``eviction_ratio``
            (measured); a record without it falls back to ``target_eviction``. Records lacking ``metric`` (or with
            a non-finite value) are skipped. A record with mode (or policy) ``"dense"`` is drawn as a horizontal
            dashed reference line labelled "dense" instead of a point.
        path: where to write the PNG (parent directories are created).
        metric: the record key to plot on y, e.g. ``"perplexity"`` (log scale) or ``"accuracy"``.
        title: figure title; defaults to ``"<metric> vs eviction"``.

    Returns:
        ``path``.

    Raises:
        ValueError: ``results`` is empty, not a list of dicts, or no record carries ``metric``.
    """
    if not isinstance(results, (list, tuple)) or len(results) == 0:
        raise ValueError("results must be a non-empty list of result records")
    if not all(isinstance(r, dict) for r in results):
        raise ValueError("results must be a list of dicts (one record per policy/mode/ratio)")

    lines: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
    dense: List[float] = []
    used_target = False
    for r in results:
        y = _number(r.get(metric))
        if y is None:
            continue
        policy, mode = str(r.get("policy", "?")), str(r.get("mode", "?"))
        if mode == "dense" or policy == "dense":
            dense.append(y)
            continue
        x = _number(r.get("eviction_ratio"))
        if x is None:
            x = _number(r.get("target_eviction"))
            used_target = True
        if x is None:
            continue
        lines.setdefault((policy, mode), []).append((x, y))
    if not lines and not dense:
        raise ValueError(f"results: no record has a numeric {metric!r} value to plot (metric={metric!r})")

    fig = _figure((7.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>pXh*"
    for i, ((policy, mode), points) in enumerate(sorted(lines.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)],
                label=f"{policy} ({mode})")
    for j, y in enumerate(dense):
        ax.axhline(y, color="black", linestyle="--", linewidth=1.2, label="dense" if j == 0 else None)

    ys = [p[1] for pts in lines.values() for p in pts] + dense
    if metric == "perplexity" and ys and min(ys) > 0:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _pos: f"{v:g}")  # "40" rather than "4x10^1"
        ax.yaxis.set_major_formatter(plain)
        if max(ys) / min(ys) < 10:  # within a decade the minor ticks carry the labels; beyond, they would clutter
            ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("eviction ratio (target where not measured)" if used_target else "eviction ratio (measured)")
    ax.set_ylabel(metric)
    ax.set_title(title if title is not None else f"{metric} vs eviction")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_quality_vs_bytes(results: List[Dict[str, Any]], path: str, metric: str = "perplexity",
                          title: Optional[str] = None) -> str:
    """Plot ``metric`` against the bytes the cache held over a dense cache's, one line per policy; save a PNG.

    Args:
        results: records with ``"held_share"`` (held bytes / dense bytes, as measured) and ``metric``, e.g. those
            of ``evaluate --budgets``; each point is annotated with the eviction the policy needed
            (``eviction_ratio``). A ``"dense"`` record is drawn as a dashed horizontal line. Records without a
            numeric ``held_share`` or ``metric`` are skipped.
        path: where to write the PNG (parent directories are created).
        metric: the record key on y (``"perplexity"`` on a log scale, or ``"accuracy"``).
        title: figure title; defaults to ``"<metric> vs bytes held"``.

    Returns:
        ``path``.

    Raises:
        ValueError: ``results`` is empty or no record has both values.
    """
    if not isinstance(results, (list, tuple)) or len(results) == 0:
        raise ValueError("results must be a non-empty list of result records")
    lines: Dict[str, List[Tuple[float, float, Optional[float]]]] = {}
    dense: List[float] = []
    for r in results:
        y = _number(r.get(metric))
        if y is None:
            continue
        if r.get("policy") == "dense" or r.get("mode") == "dense":
            dense.append(y)
            continue
        x = _number(r.get("held_share"))
        if x is not None:
            lines.setdefault(str(r.get("policy", "?")), []).append((x, y, _number(r.get("eviction_ratio"))))
    if not lines:
        raise ValueError(f"results: no record has numeric 'held_share' and {metric!r} values")
    fig = _figure((7.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>pXh*"
    for i, (policy, points) in enumerate(sorted(lines.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)], label=policy)
        for x, y, evicted in points:
            if evicted is not None:
                ax.annotate(f"{evicted:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    for j, y in enumerate(dense):
        ax.axhline(y, color="black", linestyle="--", linewidth=1.2, label="dense" if j == 0 else None)
    if metric == "perplexity":
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("bytes held / dense bytes (measured; labels: eviction needed)")
    ax.set_ylabel(metric)
    ax.set_title(title if title is not None else f"{metric} vs bytes held")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_retention_heatmap(retention_per_head: Sequence[Sequence[float]], path: str,
                           title: Optional[str] = None) -> str:
    """Heatmap of the kept fraction per (layer, KV head); save a PNG.

    Args:
        retention_per_head: ``L`` rows of ``H`` kept fractions in ``[0, 1]`` (layer 0 is the top row).
        path: where to write the PNG (parent directories are created).
        title: figure title; defaults to ``"kept fraction per layer and KV head"``.

    Returns:
        ``path``.

    Raises:
        ValueError: no rows, an empty or ragged row, or a non-numeric value.
    """
    rows = [list(row) for row in retention_per_head] if retention_per_head is not None else []
    if not rows:
        raise ValueError("retention_per_head must have at least one layer row")
    width = len(rows[0])
    if width == 0:
        raise ValueError("retention_per_head rows must have at least one KV head")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"retention_per_head is ragged: row 0 has {width} heads but row {i} has {len(row)}")
    try:
        data = [[float(v) for v in row] for row in rows]
    except (TypeError, ValueError) as exc:
        raise ValueError("retention_per_head must hold numbers (kept fractions in [0, 1])") from exc
    n_layers = len(data)

    fig = _figure((max(4.0, 0.6 * width + 2.5), max(3.0, 0.4 * n_layers + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax).set_label("kept fraction")
    if n_layers * width <= 16 * 16:
        for li, row in enumerate(data):
            for hi, v in enumerate(row):
                ax.text(hi, li, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
    if width <= 32:
        ax.set_xticks(range(width))
    if n_layers <= 32:
        ax.set_yticks(range(n_layers))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(title if title is not None else "kept fraction per layer and KV head")
    return _save(fig, path)


def plot_keep_map(keep: Any, path: str, tokens: Optional[List[str]] = None, title: Optional[str] = None) -> str:
    """Which tokens each (layer, KV head) keeps for one prompt (kept = dark, evicted = light); save a PNG.

    Args:
        keep: ``(rows, T)`` or ``(L, H, T)`` bool / 0-1 values, a ``torch.Tensor`` or ``numpy.ndarray``.
            ``(L, H, T)`` is flattened to ``(L*H, T)`` with y tick labels ``L{l}H{h}`` (every row when there are
            at most 32 rows, else the first head of each layer).
        path: where to write the PNG (parent directories are created).
        tokens: optional ``T`` token strings, used as x tick labels when ``T <= 64``.
        title: figure title; defaults to ``"kept (dark) / evicted (light) tokens"``.

    Returns:
        ``path``.

    Raises:
        ValueError: ``keep`` is not 2-D or 3-D or has an empty dimension, or ``len(tokens) != T``.
    """
    import numpy as np

    if hasattr(keep, "detach"):  # torch.Tensor, without importing torch here
        keep = keep.detach().to("cpu").float().numpy()
    data = np.asarray(keep)
    if data.ndim not in (2, 3):
        raise ValueError(f"keep must be (rows, T) or (L, H, T), got {data.ndim} dims with shape {tuple(data.shape)}")
    if 0 in data.shape:
        raise ValueError(f"keep must not have an empty dimension, got shape {tuple(data.shape)}")
    data = data.astype(np.float32)
    ylabels: Optional[List[Tuple[int, str]]] = None
    if data.ndim == 3:
        n_layers, n_heads, _ = data.shape
        data = data.reshape(n_layers * n_heads, -1)
        every = data.shape[0] <= 32
        ylabels = [(l * n_heads + h, f"L{l}H{h}") for l in range(n_layers) for h in range(n_heads)
                   if every or h == 0]
    n_rows, t = data.shape
    if tokens is not None and len(tokens) != t:
        raise ValueError(f"tokens has {len(tokens)} entries but keep has T={t} token positions")

    fig = _figure((min(16.0, max(5.0, 0.18 * t + 2.0)), min(12.0, max(2.5, 0.22 * n_rows + 1.8))))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(data, cmap="binary", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    if ylabels is not None:
        ax.set_yticks([i for i, _ in ylabels])
        ax.set_yticklabels([s for _, s in ylabels], fontsize=6 if n_rows > 16 else 8)
        ax.set_ylabel("(layer, KV head)")
    else:
        ax.set_ylabel("row (layer, KV head)")
    if tokens is not None and t <= 64:
        ax.set_xticks(range(t))
        ax.set_xticklabels([_plain_text(str(s)) for s in tokens], rotation=90, fontsize=6)
        ax.set_xlabel("token")
    else:
        ax.set_xlabel("token position")
    ax.set_title(title if title is not None else "kept (dark) / evicted (light) tokens")
    return _save(fig, path)
