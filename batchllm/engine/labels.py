"""Labels as whole token sequences, arranged in a trie: what a forward adds after a prompt to score them.

A label's log-probability is the sum over its tokens of log p(token | prompt,
earlier label tokens) (teacher forcing). Token i of a label is predicted from
the hidden state of a *reader*: reader 0 is the prompt's last position, reader
k > 0 is trie node k - 1, the label's first i tokens fed after the prompt.
Labels that share first tokens ("very good" / "very bad") share those nodes,
so each distinct label prefix is computed once per prompt. A label's last
token is never fed (nothing is predicted from it), so single-token labels
need no node at all: one position, ``W_lm[first tokens] @ h_last``.

Labels are scored as token sequences without an end marker: a label whose
tokens are a prefix of another's ("yes" / "yes please") is at least as likely.

Torch-free (the job validates labels with it before any model loads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def check_labels(labels: object) -> list[str]:
    """The labels as a list of distinct, non-empty strings; a ValueError naming ``labels`` otherwise."""
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
        raise ValueError("labels: give a non-empty list of label strings")
    out: list[str] = []
    for label in labels:
        if not isinstance(label, str) or not label:
            raise ValueError(f"labels: every label must be a non-empty str, got {label!r}")
        if label in out:
            raise ValueError(f"labels: {label!r} is given twice; labels must be distinct")
        out.append(label)
    return out


def label_token_ids(labels: Sequence[str], tokenizer: Encoder) -> list[tuple[int, ...]]:
    """Each label's tokens as a reply starts (no leading space); every label must encode to a token."""
    out: list[tuple[int, ...]] = []
    for label in check_labels(labels):
        ids = tuple(int(t) for t in tokenizer.encode(label))
        if not ids:
            raise ValueError(f"labels: {label!r} encodes to no token")
        out.append(ids)
    return out


@dataclass(frozen=True)
class LabelSet:
    """The labels, their tokens and the trie of proper label prefixes (the nodes a forward feeds).

    Nodes are in depth-first order (a node's subtree is the contiguous run
    ``[k, node_end[k])``), the order the branch tokens are stored in a sequence.
    A term (label j, reader r, token t) adds log p(t | reader r) to label j.
    """

    labels: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    node_tokens: np.ndarray  # [N] int64: the last token of each node's prefix
    node_depth: np.ndarray  # [N] int64: prefix length (position offset after the prompt's last token)
    node_end: np.ndarray  # [N] int64: index past the node's subtree
    term_label: np.ndarray  # [T] int64
    term_reader: np.ndarray  # [T] int64: 0 = the prompt's last position, k = node k - 1
    term_token: np.ndarray  # [T] int64

    @classmethod
    def build(cls, labels: Sequence[str], tokenizer: Encoder) -> LabelSet:
        """Tokenize and validate the labels; distinct strings must give distinct token sequences."""
        return cls.from_token_ids(check_labels(labels), label_token_ids(labels, tokenizer))

    @classmethod
    def from_token_ids(cls, labels: Sequence[str], token_ids: Sequence[Sequence[int]]) -> LabelSet:
        labels = check_labels(labels)
        toks = [tuple(int(t) for t in ids) for ids in token_ids]
        if len(toks) != len(labels) or not all(toks):
            raise ValueError("labels: every label needs at least one token")
        if any(t < 0 for ids in toks for t in ids):
            raise ValueError("labels: token ids must be >= 0")
        seen: dict[tuple[int, ...], str] = {}
        for label, ids in zip(labels, toks, strict=True):
            if ids in seen:
                raise ValueError(f"labels: {seen[ids]!r} and {label!r} encode to the same tokens")
            seen[ids] = label
        # sorted tuples list every prefix right before its extensions: depth-first order
        prefixes = sorted({ids[:i] for ids in toks for i in range(1, len(ids))})
        index = {p: k for k, p in enumerate(prefixes)}
        ends = []
        for k, p in enumerate(prefixes):
            e = k + 1
            while e < len(prefixes) and prefixes[e][: len(p)] == p:
                e += 1
            ends.append(e)
        terms = [
            (j, 0 if i == 0 else index[ids[:i]] + 1, ids[i])
            for j, ids in enumerate(toks)
            for i in range(len(ids))
        ]
        arr = np.array(terms, dtype=np.int64).reshape(-1, 3)
        return cls(
            labels=tuple(labels),
            token_ids=tuple(toks),
            node_tokens=np.array([p[-1] for p in prefixes], dtype=np.int64),
            node_depth=np.array([len(p) for p in prefixes], dtype=np.int64),
            node_end=np.array(ends, dtype=np.int64),
            term_label=arr[:, 0].copy(),
            term_reader=arr[:, 1].copy(),
            term_token=arr[:, 2].copy(),
        )

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_nodes(self) -> int:
        """Positions each prompt adds to the forward (0 when every label is one token)."""
        return int(self.node_tokens.shape[0])

    @property
    def max_depth(self) -> int:
        """Positions past the prompt's last one that the deepest node occupies."""
        return int(self.node_depth.max()) if self.num_nodes else 0

    @property
    def first_tokens(self) -> np.ndarray:
        """The first token of each label (the reader-0 terms), in label order."""
        return np.array([ids[0] for ids in self.token_ids], dtype=np.int64)
