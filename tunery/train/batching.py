"""Seeded data order (a pure function of seed and step, so resume needs only the step) and padding."""

from __future__ import annotations

from tunery.data.tokenize import IGNORE, Tokenized


def step_examples(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the examples optimizer step `step` (0-based) trains on: a fresh permutation per epoch."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, n)
        out.append(int(_permutation(n, seed + epoch)[offset]))
    return out


_PERMS: dict[tuple[int, int], list[int]] = {}


def _permutation(n: int, seed: int) -> list[int]:
    import torch

    key = (n, seed)
    if key not in _PERMS:
        _PERMS.clear()  # one epoch at a time is all a run needs
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return _PERMS[key]


def collate(batch: list[Tokenized], pad_id: int, device: str, multiple: int = 1) -> dict:
    """Right-padded input_ids / attention_mask / labels of shape (batch, longest rounded up to `multiple`).

    A compiled model sees few distinct lengths when `multiple` > 1, so it recompiles rarely.
    """
    import torch

    longest = -(-max(len(t.input_ids) for t in batch) // multiple) * multiple
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, t in enumerate(batch):
        ids[row, : len(t.input_ids)] = torch.tensor(t.input_ids)
        labels[row, : len(t.labels)] = torch.tensor(t.labels)
        mask[row, : len(t.input_ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def trained_tokens(batch: dict) -> int:
    """Label tokens that carry loss after the one-token shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
