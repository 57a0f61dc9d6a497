"""The fast path's settings and the state its pieces share during a step.

    FastPathOptions(cuda_graphs=False, compile=False)   # RunConfig.fast_path; --no-fast-cuda-graphs, YAML fast_path:

`FastPathOptions` is every switch and tuning constant of the fast path in one typed place: `RunConfig` carries it
(so config.yaml, the manifest and result.json record it, and `tunery train --help` lists it as `--fast-<name>`
flags), and the benchmarks set it instead of reassigning module globals. The defaults are the measured best on
an H100 (docs/benchmarks.md); each tuning constant's help says what it trades.

`StepState` is what the swapped-in modules tell each other while a step runs (a block being recomputed, the
attention stash of the block running now, a CUDA graph capture in progress). One object per fast path, handed to
each piece when it is applied; nothing lives in module globals.

This module imports nothing heavy (no torch), so the config can import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class FastPathOptions:
    """Which pieces of the fast path run, and their tuning. Applied in this order: fused LoRA, LoRA groups,
    offloaded checkpointing (and the attention stash), attention, liger ops, torch.compile (which wraps the
    offload hook from outside: kernels/ops.py), then CUDA graphs around the whole micro-batch step."""

    fused_lora: bool = _opt(True, "LoRA linears as one op with a hand-written backward (kernels/lora.py).")
    lora_groups: bool = _opt(True, "Projections that share an input (q/k/v, gate/up) as one matmul with their "
                                   "adapters, on models up to group_max_width wide (kernels/lora_group.py).")
    offload: bool = _opt(True, "With gradient checkpointing: block inputs wait in pinned CPU memory "
                               "(kernels/offload.py).")
    stash_attention: bool = _opt(True, "With offload: keep each block's attention for backward in pinned CPU "
                                       "memory instead of recomputing it, where the blocks are big enough.")
    cudnn_attention: bool = _opt(True, "Attention through sdpa with cuDNN's kernel first, on Hopper and newer "
                                       "(kernels/attention.py).")
    varlen_attention: bool = _opt(True, "With packing: each packed example's attention by varlen flash attention, "
                                        "no mask over the row (kernels/varlen.py).")
    liger_ops: bool = _opt(False, "liger-kernel's RMSNorm and SwiGLU (Llama-style families; needs tunery[gpu]).")
    compile: bool | None = _opt(None, "torch.compile each decoder block (one compiled region reused by all blocks). "
                                      "Unset: on where the run's steps are estimated to take at least "
                                      "compile_min_seconds (train/loop.py's choose_compile), else off.")
    compile_min_seconds: float = _opt(10.0, "With compile unset: the least time of a run's steps, as the advisor "
                                            "estimates it at the bench's compiled speed, that compiles. On an H100 "
                                            "compiling adds 10-20 s of warm-up and makes real-data steps 1.5-1.8x "
                                            "faster: it pays from about 10 s so estimated (docs/benchmarks.md).")
    compile_backend: str = _opt("inductor", "torch.compile's backend (tests use aot_eager on CPU).")
    cuda_graphs: bool = _opt(True, "Capture each micro-batch shape's forward+backward as a CUDA graph and replay "
                                   "it (kernels/graphs.py).")
    capture_after: int = _opt(2, "Eager runs of a batch shape before it is captured (compile, autotuning and the "
                                 "offload's host buffers happen in those).")
    max_graphs: int = _opt(4, "CUDA graphs at most (a shape takes two when gradients accumulate); later shapes "
                              "run eagerly.")
    offload_keep_bytes: int = _opt(2**20, "Saved tensors smaller than this stay on the GPU, not in the stash.")
    stash_host_fraction: float = _opt(0.25, "Share of host memory the attention stash of all blocks may pin.")
    stash_factor: float = _opt(4.0, "A block's stash, at most, in multiples of its input (q, k, v, attention out, "
                                    "output): the host memory check.")
    stash_max_bytes_per_gflop: float = _opt(100e3, "A block stashes only if its host-link bytes per GFLOP of "
                                                   "matmuls are at most this (H100: ~83 kB at 50 GB/s beside "
                                                   "~600 TFLOP/s).")
    stash_min_attention_share: float = _opt(0.15, "A block stashes only if attention holds at least this share "
                                                  "of its linear weights.")
    output_fetch: Literal["attention", "block"] = _opt(
        "attention", "When a kept attention output is fetched back: when the next block's backward reaches its "
                     "attention (less memory in use) or as that block's backward starts (more overlap).")
    last_block_on_gpu: bool = _opt(True, "The forward's last block keeps its input and stash on the GPU (its "
                                         "backward comes right after the loss).")
    last_block_on_gpu_max_tokens: int = _opt(8192, "...but only up to this many tokens (batch x sequence).")
    group_max_width: int = _opt(2048, "LoRA groups only for inputs at most this wide (wider: little gain for the "
                                      "extra memory).")
    group_kcat_backward_max_width: float = _opt(2.0, "A LoRA group's dx widens dy into one buffer when the "
                                                     "group's width is at most this many times its input's "
                                                     "(q/k/v), else chains its matmuls (gate/up).")
    allow_cpu: bool = _opt(False, "Apply the fast path on CPU too (tests only: CPU training keeps the reference).")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "fast_path") -> FastPathOptions:
        """Options from a mapping; a key that is not an option is an error naming the known ones."""
        if not isinstance(values, dict):
            raise ValueError(f"{source} must be a mapping of fast-path options, not {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults (what a report needs to say)."""
        default = FastPathOptions()
        return {k: v for k, v in self.to_dict().items() if getattr(default, k) != v}


class StepState:
    """State the fast path's modules share during a step; one per fast path (see the module doc)."""

    def __init__(self) -> None:
        # a checkpointed block is being recomputed in backward (kernels/offload.py sets it): layers whose output
        # backward never reads skip their base matmul then (kernels/lora.py). Compiled code guards on it.
        self.recomputing = False
        # the attention stash of the block running now (its forward or its recompute), or None (kernels/offload.py)
        self.stash = None
        # inside StepGraphs' capture (kernels/graphs.py): what runs now is recorded, not run
        self.capturing = False

    def in_capture(self) -> bool:
        """Whether the code running now is being captured into a CUDA graph, not run: what it queues runs at
        replays, and nothing it computes exists yet. State kept between steps (kernels/lora_group.py's adapter
        slots) must not be marked up to date here: a failed capture leaves it as it was, and a graph replays the
        whole refresh. Any stream capture counts, not only StepGraphs'."""
        import torch

        return self.capturing or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())

    def reset(self) -> None:
        """No block running or recomputing: after a step that raised part-way (a failed capture)."""
        self.recomputing, self.stash = False, None
