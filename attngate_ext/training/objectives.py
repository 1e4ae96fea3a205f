"""What one training micro-batch computes, per objective of ``python -m attngate_ext.train --objective``.

* ``lm``: next-token cross-entropy of the labels + the eviction loss (straight-through flags).
* ``distill``: ``KL(teacher || student)`` of the next-token distributions, where the teacher is the same frozen
  model with every token kept (one no-grad forward), + the eviction loss. The gates learn to evict what the
  model's own predictions do not need.
* ``attention``: each gate regresses the log future-attention score of its tokens
  (:mod:`attngate_ext.training.attention_targets`) on the frozen model with every token kept; one no-grad forward
  of the decoder and a small backward through the gates only. The eviction ratio is then set by a threshold.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, Tuple

import torch
import torch.nn as nn

from ..cache.policy import KeepEveryToken
from ..models.decoder import base_decoder
from ..models.layer_inputs import recording_layer_inputs
from ..models.model import gate_config, gated_layers
from .attention_targets import future_attention_scores, gate_logits, regression_loss, trainable_tokens
from .distributed import World, batch_share, sum_over_world
from .losses import collect_retention, distillation_loss, eviction_loss

OBJECTIVES = ("lm", "distill", "attention")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The settings of the objectives (``python -m attngate_ext.train`` builds one from its options).

    Attributes:
        alpha: weight of the eviction loss.
        per_layer, per_head: target the eviction ratio in every layer / every (layer, KV head), not globally.
        temperature: softmax temperature of ``distill``.
        min_future: ``attention``: train only on tokens seen by at least this many queries outside the window.
        grad_accum: micro-batches per optimizer step (each backward is divided by it).
    """

    alpha: float = 10.0
    per_layer: bool = False
    per_head: bool = False
    temperature: float = 1.0
    min_future: int = 128
    grad_accum: int = 1


@contextlib.contextmanager
def every_token_kept(model: nn.Module) -> Iterator[None]:
    """Within the block the gated model keeps every token (its gates are bypassed): the unmodified model."""
    layers = gated_layers(model)
    saved = [attn.policy for attn in layers]
    keep_all = KeepEveryToken()
    for attn in layers:
        attn.policy = keep_all
    try:
        yield
    finally:
        for attn, policy in zip(layers, saved):
            attn.policy = policy


def lm_step(model: nn.Module, batch: Dict[str, torch.Tensor], target: float, config: ObjectiveConfig,
            world: World = World()) -> Dict[str, Any]:
    """Cross-entropy of the labels + the eviction loss; backward; returns the losses and retention statistics."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    return _with_eviction(model, out.loss, targets, target, config, world)


def distill_step(model: nn.Module, batch: Dict[str, torch.Tensor], target: float, config: ObjectiveConfig,
                 world: World = World()) -> Dict[str, Any]:
    """KL to the same model with every token kept (over the non-padding positions) + the eviction loss."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with torch.no_grad(), every_token_kept(model):
        teacher = model(**kwargs).logits
    student = model(**kwargs).logits
    kl = distillation_loss(student, teacher, batch["attention_mask"].bool(), config.temperature)
    return _with_eviction(model, kl, int(batch["attention_mask"].sum()), target, config, world)


def _with_eviction(model: nn.Module, task: torch.Tensor, count: int, target: float, config: ObjectiveConfig,
                   world: World) -> Dict[str, Any]:
    """Adds the eviction loss and runs the backward. Under data parallelism both terms are this process's share
    of the global batch's loss, so that averaging the gradients gives the global batch's gradient."""
    retain, valid = collect_retention(model)
    reduce = (lambda t: sum_over_world(t, world)) if world.size > 1 else None
    evict, stats = eviction_loss(retain, valid, target, config.alpha, config.per_layer, config.per_head,
                                 reduce=reduce, processes=world.size)
    share = batch_share(count, world)
    loss = task * share + evict
    (loss / config.grad_accum).backward()
    # Logged values: averaged over the processes they are the global batch's (the task loss weighted by share).
    return {"loss": task.item() * share + evict.item(), "task_loss": task.item() * share,
            "eviction_loss": evict.item(), "target": target, **stats}


def attention_targets(model: nn.Module, batch: Dict[str, torch.Tensor],
                      config: ObjectiveConfig) -> Iterator[Tuple[Any, ...]]:
    """Per gated layer ``(attention module, layer input, gate cos, gate sin, log-scores (B, H, T))`` from one
    no-grad forward of the decoder with every token kept; also the ``(B, T)`` mask of trainable tokens, as the
    first item yielded."""
    layers = gated_layers(model)
    gates_config = gate_config(model)
    with torch.no_grad(), every_token_kept(model), recording_layer_inputs(model) as inputs:
        base_decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    valid = batch["attention_mask"].bool()
    yield trainable_tokens(valid, tuple(valid.shape), gates_config.protect_recent, gates_config.sink_tokens,
                           config.min_future, valid.device)
    for attn, captured in zip(layers, inputs):
        hidden = captured.hidden
        with torch.no_grad():
            query, key, value = attn.project(hidden, captured.position_embeddings)
        B, T, _ = hidden.shape
        scores = future_attention_scores(query, key, value, attn.attention.o_proj.weight, hidden, valid,
                                         gates_config.protect_recent, attn.scaling, softcap=attn.softcap)
        position_ids = captured.position_ids
        if position_ids is not None:
            position_ids = position_ids.expand(B, T)
        cos, sin = attn.gate_rope(hidden, captured.position_embeddings, position_ids)
        yield attn, hidden, cos, sin, scores


def attention_step(model: nn.Module, batch: Dict[str, torch.Tensor], target: float, config: ObjectiveConfig,
                   world: World = World()) -> Dict[str, Any]:
    """Regresses every gate's logits on the log future-attention scores of the unmodified model; backward."""
    layers = attention_targets(model, batch, config)
    mask = next(layers)
    count = len(gated_layers(model))
    total = 0.0
    share = batch_share(int(mask.sum()), world)
    for attn, hidden, cos, sin, scores in layers:
        loss = regression_loss(gate_logits(attn.gate, hidden, cos, sin), scores, mask) / count
        (loss * share / config.grad_accum).backward()
        total += loss.item() * share
    return {"loss": total, "task_loss": total, "eviction_loss": 0.0, "target": target,
            "trained_tokens": int(mask.sum())}


@torch.no_grad()
def init_biases_to_mean_scores(model: nn.Module, batch: Dict[str, torch.Tensor], config: ObjectiveConfig,
                               world: World = World()) -> None:
    """--objective attention, fresh gates: each gate's bias starts at the mean log-score of its KV head on
    ``batch`` (over the processes), so the regression starts at the right level instead of climbing down from
    the keep-everything bias."""
    layers = attention_targets(model, batch, config)
    mask = next(layers)
    weight = mask.unsqueeze(1).float()
    for attn, _, _, _, scores in layers:
        sums = sum_over_world((scores * weight).sum(dim=(0, 2)), world)
        counts = sum_over_world(weight.sum(dim=(0, 2)).expand(scores.shape[1]), world).clamp_min(1.0)
        attn.gate.score.bias.copy_((sums / counts).to(attn.gate.score.bias))


STEPS = {"lm": lm_step, "distill": distill_step, "attention": attention_step}
