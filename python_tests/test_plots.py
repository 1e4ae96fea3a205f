"""attngate_ext.evaluation.plots: each plot writes a non-blank PNG of plausible size, and bad inputs raise clear ValueErrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402

from attngate_ext.evaluation import plots  # noqa: E402


def _check_png(path, min_side: int = 150) -> np.ndarray:
    assert path.exists(), f"{path} was not written"
    image = mpimg.imread(str(path))
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    height, width = image.shape[:2]
    assert min_side <= height <= 4000 and min_side <= width <= 4000, image.shape
    assert float(image.std()) > 0.01, "image is blank"
    return image


def _results(with_dense: bool = True):
    records = []
    if with_dense:
        records.append({"policy": "dense", "mode": "dense", "target_eviction": 0.0, "eviction_ratio": 0.0,
                        "perplexity": 20.0, "accuracy": 0.7})
    for i, policy in enumerate(["streaming_llm", "h2o", "gate"]):
        for ratio in [0.75, 0.25, 0.5]:  # unsorted on purpose
            records.append({"policy": policy, "mode": "in_context", "target_eviction": ratio,
                            "eviction_ratio": ratio - 0.01 * i, "perplexity": 20.0 * (1 + ratio * (i + 1)),
                            "accuracy": 0.7 - 0.2 * ratio, "kv_bytes": int(1000 * (1 - ratio))})
    records.append({"policy": "h2o", "mode": "post_prefill", "target_eviction": 0.5, "eviction_ratio": 0.5,
                    "perplexity": 35.0})  # no accuracy: skipped for metric="accuracy"
    return records


def test_quality_vs_eviction(tmp_path):
    path = tmp_path / "sub" / "dir" / "ppl.png"  # parents are created
    out = plots.plot_quality_vs_eviction(_results(), str(path))
    assert out == str(path)
    _check_png(path)


def test_quality_vs_eviction_accuracy_and_title(tmp_path):
    path = tmp_path / "acc.png"
    plots.plot_quality_vs_eviction(_results(), str(path), metric="accuracy", title="accuracy on a toy task")
    _check_png(path)


def test_quality_vs_eviction_dense_reference_line(tmp_path):
    path = tmp_path / "dense.png"
    records = [{"policy": "dense", "mode": "dense", "target_eviction": 0.0, "eviction_ratio": 0.0, "perplexity": 12.0},
               {"policy": "gate", "mode": "in_context", "target_eviction": 0.5, "eviction_ratio": 0.48,
                "perplexity": 14.0}]
    plots.plot_quality_vs_eviction(records, str(path))
    _check_png(path)
    # Only the dense record: still a plot (just the reference line).
    only = tmp_path / "only_dense.png"
    plots.plot_quality_vs_eviction(records[:1], str(only))
    _check_png(only)


def test_quality_vs_eviction_target_fallback(tmp_path):
    # Accuracy-only runs carry no measured eviction_ratio: the target ratio is used for x.
    records = [{"policy": "h2o", "mode": "in_context", "target_eviction": r, "accuracy": 0.6 - r / 4}
               for r in (0.25, 0.5, 0.75)]
    path = tmp_path / "target.png"
    plots.plot_quality_vs_eviction(records, str(path), metric="accuracy")
    _check_png(path)


def test_quality_vs_eviction_errors(tmp_path):
    with pytest.raises(ValueError, match="results"):
        plots.plot_quality_vs_eviction([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="results"):
        plots.plot_quality_vs_eviction(["not a dict"], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="accuracy"):
        plots.plot_quality_vs_eviction([{"policy": "h2o", "mode": "in_context", "eviction_ratio": 0.5,
                                         "perplexity": 3.0}], str(tmp_path / "x.png"), metric="accuracy")
    assert not (tmp_path / "x.png").exists()


def test_retention_heatmap(tmp_path):
    retention = [[0.1, 0.5, 0.9], [0.0, 1.0, 0.3], [0.7, 0.2, 0.6], [0.4, 0.8, 0.05]]  # 4 layers x 3 KV heads
    path = tmp_path / "heat" / "retention.png"
    assert plots.plot_retention_heatmap(retention, str(path), title="toy") == str(path)
    _check_png(path)


def test_retention_heatmap_large_without_cell_text(tmp_path):
    retention = torch.rand(24, 16, generator=torch.Generator().manual_seed(0)).tolist()  # > 16 x 16 cells
    path = tmp_path / "big.png"
    plots.plot_retention_heatmap(retention, str(path))
    _check_png(path)


def test_retention_heatmap_errors(tmp_path):
    with pytest.raises(ValueError, match="retention_per_head"):
        plots.plot_retention_heatmap([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="retention_per_head.*ragged"):
        plots.plot_retention_heatmap([[0.1, 0.2], [0.3]], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="retention_per_head"):
        plots.plot_retention_heatmap([[]], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="retention_per_head"):
        plots.plot_retention_heatmap([["a", "b"]], str(tmp_path / "x.png"))


def _keep(shape=(2, 3, 20)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5


def test_keep_map_3d_with_tokens(tmp_path):
    tokens = [f"tok{i}" for i in range(18)] + ["$x", "\n"]  # '$' must not trigger mathtext, newline stays visible
    path = tmp_path / "keep" / "keep_map.png"
    assert plots.plot_keep_map(_keep(), str(path), tokens=tokens, title="toy keep map") == str(path)
    _check_png(path)


def test_keep_map_2d_numpy_and_many_rows(tmp_path):
    path = tmp_path / "keep2d.png"
    plots.plot_keep_map(_keep((6, 20)).numpy().astype(np.uint8), str(path))
    _check_png(path)
    # 40 rows (> 32): only each layer's first head is labelled; T > 64 ignores the tokens for tick labels.
    many = tmp_path / "many.png"
    plots.plot_keep_map(_keep((10, 4, 80)), str(many), tokens=[str(i) for i in range(80)])
    _check_png(many)


def test_keep_map_errors(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        plots.plot_keep_map(torch.ones(5, dtype=torch.bool), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="keep"):
        plots.plot_keep_map(torch.ones(1, 2, 3, 4, dtype=torch.bool), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="keep"):
        plots.plot_keep_map(torch.ones(2, 0, dtype=torch.bool), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="tokens"):
        plots.plot_keep_map(_keep(), str(tmp_path / "x.png"), tokens=["a", "b"])
