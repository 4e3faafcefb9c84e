"""Task heads on a shared encoder: each maps the encoder's hidden states to (loss, logits)."""

from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """Dropout + linear on the first token ([CLS]); cross-entropy over the label set."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        logits = self.out(self.dropout(hidden[:, 0]))
        labels = batch.get("labels")
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return loss, logits


class SpanHead(nn.Module):
    """Start/end logits per token; loss is the mean of the start and end cross-entropies."""

    def __init__(self, hidden_size: int, num_labels: int = 2):
        super().__init__()
        self.out = nn.Linear(hidden_size, 2)

    def forward(self, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        logits = self.out(hidden).float()
        mask = batch["attention_mask"] == 0
        logits = logits.masked_fill(mask.unsqueeze(-1), torch.finfo(logits.dtype).min)  # never predict padding
        start, end = logits.unbind(-1)
        loss = None
        if "start_positions" in batch:
            loss = (nn.functional.cross_entropy(start, batch["start_positions"])
                    + nn.functional.cross_entropy(end, batch["end_positions"])) / 2
        return loss, logits
