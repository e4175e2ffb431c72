"""Label log-probabilities from the hidden states a prefill-only forward reads (``labels.LabelSet``).

Each item (one request's prompt) accumulates one log-probability per label
over the steps that compute its positions. At the item's last prompt
position (reader 0) only the labels' first-token logits are computed,
``W_lm[first tokens] @ h``: the log-softmax normalizer there is the same for
every label and cancels in the softmax over labels. At a label node the full
vocabulary is normalized (the labels continuing from it compete with every
other token), so multi-token labels cost one vocabulary row per node; a label
set of distinct single tokens never computes one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchllm.engine.attention import to_device
from batchllm.engine.labels import LabelSet

_ROWS_PER_SLICE = 512  # node rows normalized over the vocabulary at once (bounds the logits' memory)


class LabelScorer:
    """Per-item label log-probabilities, accumulated as their readers' hidden states come in."""

    def __init__(self, labels: LabelSet, num_items: int, device: torch.device) -> None:
        self.labels = labels
        self.acc = torch.zeros(num_items, labels.num_labels, dtype=torch.float32, device=device)
        self.first = to_device(labels.first_tokens, device)
        nodes = labels.term_reader > 0
        self.term_node = to_device(labels.term_reader[nodes] - 1, device)
        self.term_label = to_device(labels.term_label[nodes], device)
        self.term_token = to_device(labels.term_token[nodes], device)

    @torch.inference_mode()
    def add(self, model: Any, hidden: torch.Tensor, items: np.ndarray, readers: np.ndarray) -> None:
        """Add the terms read from ``hidden`` [R, hidden] (row r: item ``items[r]``, reader ``readers[r]``)."""
        dev = self.acc.device
        at_last = readers == 0
        if at_last.any():
            rows = to_device(np.flatnonzero(at_last), dev)
            weight = model.lm_head_weight[self.first].float()  # [labels, hidden]
            logits = hidden[rows].float() @ weight.T
            self.acc.index_add_(0, to_device(items[at_last], dev), logits)
        at_node = np.flatnonzero(~at_last)
        for lo in range(0, at_node.size, _ROWS_PER_SLICE):
            part = at_node[lo : lo + _ROWS_PER_SLICE]
            rows = to_device(part, dev)
            logp = torch.log_softmax(model.compute_logits(hidden[rows]), dim=-1)
            node = to_device(readers[part] - 1, dev)
            mine = node[:, None] == self.term_node[None, :]  # [rows, node terms]: the terms this node reads
            vals = torch.where(mine, logp[:, self.term_token], torch.zeros((), device=dev))
            contrib = torch.zeros(part.size, self.labels.num_labels, device=dev)
            contrib.index_add_(1, self.term_label, vals)
            self.acc.index_add_(0, to_device(items[part], dev), contrib)

    def probs(self) -> np.ndarray:
        """[items, labels] softmax over the labels' summed log-probabilities."""
        return torch.softmax(self.acc, dim=-1).cpu().numpy()
