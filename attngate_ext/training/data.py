"""Training data for the gates: plain-text documents packed into fixed-length sequences, and SFT records.

Packing rule (continual pre-training): a sequence never spans two documents. Each document is tokenised on its
own (with EOS appended) and cut into ``seq_len`` pieces; its last piece is right-padded, and padding is masked
out of attention and of the loss. So no token ever attends across a document border.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .utils import read_jsonl

IGNORE_INDEX = -100  # label of tokens outside the loss (prompt, padding), as in transformers


@dataclass
class Examples:
    """Fixed-length training examples: ``input_ids``, ``attention_mask`` and ``labels``, each ``(N, seq_len)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict]:
        """Endless shuffled batches; epoch e uses permutation seed ``seed + e``, so a resumed run continues the
        same order from ``start_step``."""
        if len(self) == 0:
            raise ValueError("no training examples")
        per_epoch = max(len(self) // batch_size, 1)
        step = start_step
        while True:
            epoch, offset = divmod(step, per_epoch)
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed + epoch))
            index = order[offset * batch_size : (offset + 1) * batch_size]
            if index.numel() < batch_size:  # fewer examples than one batch: wrap around
                index = order.repeat(batch_size // len(self) + 1)[:batch_size]
            yield {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                   "labels": self.labels[index]}
            step += 1


def read_text_documents(paths: Sequence[str]) -> List[str]:
    """Each file is one document; a directory contributes every ``*.txt`` file under it (sorted)."""
    files: List[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.rglob("*.txt")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no text file or directory at {str(path)!r}")
    if not files:
        raise ValueError(f"no .txt files found in {list(paths)}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int, pad_id: int, min_tokens: int = 2) -> Examples:
    """Cuts each tokenised document into ``seq_len`` pieces (last one right-padded); pieces with fewer than
    ``min_tokens`` tokens are dropped (they carry no next-token target)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    rows, masks = [], []
    for doc in documents:
        doc = list(doc)
        for start in range(0, len(doc), seq_len):
            piece = doc[start : start + seq_len]
            if len(piece) < min_tokens:
                continue
            rows.append(piece + [pad_id] * (seq_len - len(piece)))
            masks.append([1] * len(piece) + [0] * (seq_len - len(piece)))
    ids = torch.tensor(rows, dtype=torch.long).view(-1, seq_len)
    mask = torch.tensor(masks, dtype=torch.long).view(-1, seq_len)
    return Examples(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX))


def text_examples(tokenizer, paths: Sequence[str], seq_len: int, max_documents: Optional[int] = None) -> Examples:
    """Continual pre-training examples from plain-text files (see the packing rule in the module docstring)."""
    texts = read_text_documents(paths)[:max_documents]
    eos = tokenizer.eos_token_id
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []) for text in texts]
    return pack_documents(docs, seq_len, _pad_id(tokenizer))


def sft_examples(tokenizer, path: str, seq_len: int) -> Examples:
    """SFT examples from JSONL records ``{"prompt": ..., "answer": ...}``: the prompt's tokens are masked out of
    the loss (label -100), the answer (plus EOS) is learned; records longer than ``seq_len`` are truncated and
    shorter ones right-padded."""
    rows, masks, labels = [], [], []
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    for number, record in read_jsonl(path):
        prompt_text, answer_text = _sft_fields(record, path, number)
        prompt = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        answer = tokenizer(answer_text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (prompt + answer)[:seq_len]
        target = ([IGNORE_INDEX] * len(prompt) + answer)[:seq_len]
        n = len(ids)
        rows.append(ids + [pad] * (seq_len - n))
        masks.append([1] * n + [0] * (seq_len - n))
        labels.append(target + [IGNORE_INDEX] * (seq_len - n))
    if not rows:
        raise ValueError(f"no SFT records in {path!r}")
    return Examples(torch.tensor(rows), torch.tensor(masks), torch.tensor(labels))


def _sft_fields(record: dict, path: str, number: int) -> Tuple[str, str]:
    """The prompt and answer strings of one SFT record; anything else is a ValueError naming ``path:line``."""
    if not {"prompt", "answer"} <= set(record):
        raise ValueError(f"{path}:{number}: each SFT record needs 'prompt' and 'answer' fields")
    for field in ("prompt", "answer"):
        if not isinstance(record[field], str):
            raise ValueError(f"{path}:{number}: '{field}' must be a string, got {type(record[field]).__name__} "
                             f"{record[field]!r}")
    return record["prompt"], record["answer"]


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
