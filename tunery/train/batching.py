"""Seeded data order (a pure function of seed and step, so resume needs only the step), padding and packing."""

from __future__ import annotations

import itertools
import math

from tunery.data.tokenize import IGNORE, Tokenized
from tunery.kernels.varlen import BOUNDS as DOC_BOUNDS  # a packed row's example bounds: the batch key varlen reads

SEQ_IDX = "seq_idx"  # a packed row's example number per token: the batch key and the forward's keyword
TRAINED = "trained_tokens"  # a batch's label tokens that carry loss, counted on the host (`trained_tokens`)


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


def micro_batches(picked: list[Tokenized], batch_size: int, rank: int = 0, world: int = 1,
                  by_length: bool = True) -> list[list[Tokenized]]:
    """This rank's micro-batches of one optimizer step's examples: micro-batch m of rank r is the
    (m * world + r)-th slice of `batch_size`. `by_length`: the step's examples are sorted by length first, so
    each micro-batch pads only to a length near its own examples' (the step's loss and update are sums over all
    of its tokens, whichever micro-batch holds them); the sort is stable, so the split stays a pure function of
    the step."""
    order = sorted(picked, key=lambda t: len(t.input_ids)) if by_length else picked
    return [order[i : i + batch_size] for i in range(rank * batch_size, len(order), batch_size * world)]


def bucket(n: int, multiple: int = 64) -> int:
    """The shortest length of a fixed ladder that holds `n` tokens: multiples of `multiple` up to 8 of them,
    then four lengths per doubling (each about 19% over the last), rounded up to `multiple`. Micro-batches cut
    by token budget take their lengths from it, so a run meets a dozen shapes, not one per multiple of 64:
    each new shape costs a compile and a CUDA graph capture. The ladder pads by a quarter at most, a tenth
    on average."""
    top = 8 * multiple
    if n <= top:
        return max(multiple, -(-n // multiple) * multiple)
    k = max(0, math.floor(4 * math.log2(n / top)) - 1)  # the loop finds the first ladder length that holds n
    while True:
        length = -(-int(math.ceil(top * 2 ** (k / 4))) // multiple) * multiple
        if length >= n:
            return length
        k += 1


def token_micro_batches(picked: list[Tokenized], budget: int, packed: bool) -> list[list[Tokenized]]:
    """One optimizer step's examples as micro-batches of about `budget` tokens each, instead of `batch_size`
    examples each; every example lands in exactly one, and the step's loss and update are the same sums.

    Padded (`packed` False): the examples sorted by length, each micro-batch as many of them as fit in `budget`
    tokens once padded to the ladder length of its longest (`bucket`); short examples share a micro-batch by
    the dozen, long ones go a few at a time. Packed: rows of at most `budget` tokens, filled first-fit with
    the examples longest first, so rows come out full and of one length. An example longer than `budget` gets
    a micro-batch of its own. The result is a pure function of the examples (resume rebuilds it)."""
    if budget <= 0:
        raise ValueError("a token budget must be positive")
    if packed:
        rows: list[list[Tokenized]] = []
        used: list[int] = []
        for t in sorted(picked, key=lambda t: -len(t.input_ids)):  # stable: ties keep the step's order
            n = len(t.input_ids)
            at = next((i for i, u in enumerate(used) if u + n <= budget), None)
            if at is None:
                rows.append([t])
                used.append(n)
            else:
                rows[at].append(t)
                used[at] += n
        return rows
    out: list[list[Tokenized]] = []
    for t in sorted(picked, key=lambda t: len(t.input_ids)):
        group = out[-1] if out else None
        if group and (len(group) + 1) * bucket(len(t.input_ids)) <= budget:
            group.append(t)
        else:
            out.append([t])
    return out


def row_length(tokens: int, budget: int, multiple: int = 64) -> int:
    """The length a packed row of `tokens` is padded to under a token budget: the ladder's (`bucket`), but never
    past the budget itself (rounded up to `multiple`), so full rows share one length."""
    cap = -(-budget // multiple) * multiple
    return bucket(tokens, multiple) if tokens > cap else min(bucket(tokens, multiple), cap)


def collate(batch: list[Tokenized], pad_id: int, device: str, multiple: int = 1, mask: bool = True,
            length: int | None = None) -> dict:
    """Right-padded input_ids / attention_mask / labels of shape (batch, longest rounded up to `multiple`).

    A compiled model sees few distinct lengths when `multiple` > 1, so it recompiles rarely. `mask=False` leaves
    the attention mask out: a causal model then computes the same loss and gradients, since with padding on the
    right no real token attends to a pad and no pad carries a label (train/loop.py's fast path).
    """
    import torch

    longest = -(-max(len(t.input_ids) for t in batch) // multiple) * multiple
    if length is not None:  # a ladder length (`bucket`) instead
        longest = max(length, max(len(t.input_ids) for t in batch))
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
    real = torch.zeros((len(batch), longest), dtype=torch.long)  # 1 on each row's tokens, 0 on its padding
    for row, t in enumerate(batch):
        ids[row, : len(t.input_ids)] = torch.tensor(t.input_ids)
        labels[row, : len(t.labels)] = torch.tensor(t.labels)
        real[row, : len(t.input_ids)] = 1
    out = {"input_ids": to_device(ids, device), "labels": to_device(labels, device), "real_tokens": int(real.sum()),
           TRAINED: int((labels[:, 1:] != IGNORE).sum())}
    return {**out, "attention_mask": to_device(real, device)} if mask else out


def pack_batch(batch: list[Tokenized], device: str, multiple: int = 1, length: int | None = None,
               fixed_bounds: bool = False, seq_idx: bool = False) -> dict:
    """The micro-batch as one row (1, total) with no padding: input_ids, labels and position_ids that restart
    at 0 for each example, no attention_mask, and `doc_bounds` (int32: 0, where each example ends, the row's
    length), which the fast path's varlen attention reads (kernels/varlen.py).

    Given position_ids and no attention_mask (and no KV cache), transformers reads a restart of the positions
    as a new document and builds a block-diagonal causal mask (sdpa, eager, flex) or runs varlen flash
    attention, so no token attends across examples. The first label of each example is IGNORE so that the
    last token of one example is not trained to predict the first of the next. With `multiple` > 1 the tail
    is filled with one dummy example (labels IGNORE, its own positions) for a compiled model's sake; `length`
    pads the row to that length instead. `fixed_bounds` repeats the last bound until `doc_bounds` has a power of
    two entries (at least 8: empty examples at the end, which varlen attention skips), so rows holding
    different numbers of examples share a shape, which a CUDA graph needs. `seq_idx` adds each token's example
    number (int32, the dummy tail one of its own), which a model with bounded convolutions reads
    (models/packing.py).
    """
    import torch

    ids, labels, positions = [], [], []
    for t in batch:
        ids += t.input_ids
        labels += [IGNORE, *t.labels[1:]][: len(t.labels)]  # nothing predicts an example's first token
        positions += range(len(t.input_ids))
    total = len(ids)
    tail = (max(length, total) if length is not None else -(-total // multiple) * multiple) - total
    # any id would do for the tail: its labels are IGNORE and no real token can attend to it
    row = {"input_ids": ids + [0] * tail, "labels": labels + [IGNORE] * tail,
           "position_ids": positions + list(range(tail))}
    ends = list(itertools.accumulate(len(t.input_ids) for t in batch)) + ([total + tail] if tail else [])
    if fixed_bounds:
        ends += [ends[-1]] * (max(8, 1 << len(ends).bit_length()) - len(ends) - 1)
    out = {**{k: to_device(torch.tensor([v], dtype=torch.long), device) for k, v in row.items()},
           DOC_BOUNDS: to_device(torch.tensor([0, *ends], dtype=torch.int32), device), "real_tokens": total,
           TRAINED: sum(label != IGNORE for label in row["labels"][1:])}
    if seq_idx:
        example = [i for i, t in enumerate(batch) for _ in t.input_ids] + [len(batch)] * tail
        out[SEQ_IDX] = to_device(torch.tensor([example], dtype=torch.int32), device)
    return out


def packing_problem(model) -> str | None:
    """Why examples packed into one row would see each other in `model`, or None. Attention stays inside each
    example (the positions restart: see `pack_batch`), but a convolution over the sequence reaches across the
    boundary into the example packed before: LFM2's short convolutions are bounded at it (models/packing.py,
    which training applies to a packed run), any other kind is refused."""
    import torch

    from tunery.models.packing import boundable

    convolving = sorted({type(m).__name__ for m in model.modules()
                         if any(isinstance(c, torch.nn.Conv1d) for c in m.children()) and not boundable(m)})
    if convolving:
        return f"its blocks mix neighbouring tokens by convolution ({', '.join(convolving)}), across examples too"
    return None


def trained_tokens(batch: dict) -> int:
    """Label tokens that carry loss after the one-token shift: counted on the host when the batch was built
    (reading them back from the GPU would wait for it), else from the labels."""
    if TRAINED in batch:
        return batch[TRAINED]
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def to_device(tensor, device: str):
    """A host tensor on `device`; to a GPU through pinned memory without waiting (the copy is queued on the
    stream, after the work already there, so a batch can be built while a step runs)."""
    if str(device).startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
