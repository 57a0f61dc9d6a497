"""Peak GPU memory of a training step, predicted from the model's shape (advisor/shape.py) and the run's settings.

    peak = predict_peak(shape, method="lora", batch=2, seq=2048)   # -> Peak, .gib and .describe()

The parts, as tunery's training step holds them at its peak (the last micro-batch's backward):
- weights: 2 bytes a parameter in bf16; QLoRA stores the blocks' linear layers in NF4 (half a byte, plus the
  double-quantized scales), and dequantizes the layers it runs into bf16 temporaries (kernels/nf4.py);
- what trains: LoRA adapters in fp32 (PEFT keeps them in fp32 over a 16-bit base), with their gradients and
  AdamW's two moments, 16 bytes a parameter; a full fine-tune trains the bf16 weights themselves, with bf16
  gradients and AdamW moments in the weights' dtype (torch's AdamW), 6 more bytes a parameter. The 8-bit AdamW
  (`optimizer="adamw_8bit"`) keeps each moment in one byte (its blockwise scales are under 0.5% of that);
- activations: with checkpointing and the fast path's offload, only the block being recomputed holds its
  activations (the others' inputs wait in pinned CPU memory): `ACT_BYTES` per token per output feature of that
  block's linears. Checkpointing without offload adds every block's input (2 bytes x hidden a token a block);
  no checkpointing keeps every block's activations (`ACT_BYTES_KEPT` per feature, an uncalibrated count of
  the tensors saved for backward);
- the loss: the fused linear + cross-entropy holds one chunk of logits (kernels/linear_ce.py); without it the
  full (tokens x vocabulary) logits in bf16 plus their fp32 softmax and gradient.

`ACT_BYTES` is calibrated on the peaks `bench/lora_bench.py` measured (docs/benchmarks.md, the H100 matrix at
b7a1166 and the H200 family rows); `tests/advisor/test_memory.py` holds every recorded row within 15% or 1 GiB,
and `python bench/memory_model.py` prints predicted against measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunery.advisor.shape import Shape

GIB = 2**30
# bytes a token a block-linear output feature, while one checkpointed block is recomputed and run backward: its
# outputs, their gradients and the recomputed copies (bf16). Fitted to the recorded peaks (module docstring).
ACT_BYTES = 6.0
# the same with no checkpointing, for every block at once: what backward keeps of a Llama block a token, in bf16:
# the norms' and linears' inputs, q/k/v and attention's output, gate, up and the activation's output, about
# (7 x hidden + 3 x intermediate) x 2 bytes, ~3.3 bytes a linear output feature, and the norms' fp32 copies.
# Counted, not measured (the bench rows all checkpoint).
ACT_BYTES_KEPT = 4.0
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit code, an 8-bit scale per 64 weights, fp32 per 256 scales
LOSS_CHUNK_BYTES = 2**25 * 2 * 3  # kernels/linear_ce.py: 2**25 logits in bf16, the chunk's peak about 3 times that
METHODS = ("lora", "qlora", "full")


@dataclass(frozen=True)
class Peak:
    parts: dict[str, float]  # GiB per part, in the order the docstring lists them

    @property
    def gib(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        return f"~{self.gib:.1f} GiB (" + ", ".join(f"{k} {v:.1f}" for k, v in self.parts.items() if v >= 0.05) + ")"


def predict_peak(shape: Shape, method: str = "lora", batch: int = 1, seq: int = 2048, *, lora_r: int = 16,
                 lora_targets: tuple[str, ...] | list[str] = (), checkpointing: bool = True, offload: bool = True,
                 fused_loss: bool = True, optimizer: str = "adamw") -> Peak:
    """Peak GPU memory of one training step of `batch` rows of `seq` tokens (a packed row: batch 1)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    tokens = batch * seq
    params, block = shape.params, shape.block_linear_params
    if method == "qlora":
        weights = (params - block) * 2 + block * NF4_BYTES + 2 * shape.widest_linear * 2  # + dequantized temporaries
    else:
        weights = params * 2
    eight_bit = optimizer == "adamw_8bit"
    if method == "full":
        trained = params * (2 + (1 + 1 if eight_bit else 2 + 2))  # gradients, then the two moments
    else:
        trained = shape.lora_params(lora_r, lora_targets) * (4 + 4 + (1 + 1 if eight_bit else 4 + 4))
    if checkpointing:
        activations = tokens * ACT_BYTES * shape.block_outputs
        if not offload:
            activations += tokens * 2 * shape.hidden * shape.layers
    else:
        activations = tokens * ACT_BYTES_KEPT * shape.block_outputs * shape.layers
    loss = LOSS_CHUNK_BYTES if fused_loss else tokens * shape.vocab * (2 + 4 + 4)
    return Peak({"weights": weights / GIB, "trained": trained / GIB, "activations": activations / GIB,
                 "loss": loss / GIB})
