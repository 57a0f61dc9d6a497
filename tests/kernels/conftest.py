"""A tiny PEFT LoRA model whose adapters already act (B is not zero), and what the compile tests read, for the
kernel tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny_lora(tiny_tokenizer):
    """tiny_lora(family, num_layers, dropout, ...) -> a fresh seeded LoRA model (r 4, alpha 8 unless told) on the
    session tokenizer; width, rank, device and dtype as given (the GPU tests build wider bf16 models)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunery.models.lora import apply_lora
    from tunery.models.tiny import TinySpec, make_config

    def build(family: str = "llama", num_layers: int = 2, dropout: float = 0.0, hidden_size: int = 32,
              intermediate_size: int = 64, rank: int = 4, b_std: float = 0.1, device: str = "cpu",
              dtype: torch.dtype = torch.float32):
        torch.manual_seed(0)
        spec = TinySpec(family=family, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_layers=num_layers)
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(make_config(spec, tiny_tokenizer), dtype=dtype)
        model = apply_lora(base, rank, 2 * rank, dropout)
        for name, p in model.named_parameters():  # B starts at zero in PEFT; make the adapter do something
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=b_std)
        return model

    return build


@pytest.fixture
def loss_and_grads():
    """loss_and_grads(model, batch, fast) -> (summed loss, {trainable name: grad}) of one forward + backward."""
    from tunery.train.loss import summed_loss

    def run(model, batch, fast=None):
        model.zero_grad(set_to_none=True)
        loss = summed_loss(model, batch, fast)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    return run


class GraphLog:
    """A torch.compile backend that keeps each dynamo graph (one per compilation) and the AOT graphs it lowers to
    (`inference` under no_grad, else `forward` and `backward`), then runs them with `then` (eager by default).
    `min_cut`: split forward from backward as inductor does, instead of aot_autograd's default split."""

    def __init__(self, then=None, min_cut: bool = False):
        self.dynamo, self.aot, self.then, self.min_cut = [], [], then, min_cut

    def __call__(self, gm, inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.dynamo.append(gm)
        if self.then is not None:
            return self.then(gm, inputs)

        def keep(kind):
            return lambda g, _: self.aot.append((kind, g)) or make_boxed_func(g.forward)

        split = {}
        if self.min_cut:  # what inductor partitions with: it decides what backward saves and what it recomputes
            from functorch.compile import min_cut_rematerialization_partition as split_fn

            split = {"partition_fn": split_fn}
        return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                            inference_compiler=keep("inference"), **split)(gm, inputs)

    def saved(self) -> list[tuple]:
        """Shapes of the backward graphs' tensor inputs: what forward saved for them (and the output grads)."""
        return [tuple(n.meta["val"].shape) for k, g in self.aot if k == "backward"
                for n in g.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]

    def count(self, kind: str, op) -> int:
        """How many calls of `op` the `kind` graphs make."""
        return sum(n.target == op for k, g in self.aot if k == kind for n in g.graph.nodes)

    def weights(self, kind: str, *ops) -> list[tuple]:
        """Shapes of the second inputs of `ops` in the `kind` graphs: the base weights of tunery::lora_out and
        lora_dx (and of aten.mm in a backward, where `dy W` is a plain matmul when LoRA dropout is on)."""
        return [tuple(n.args[1].meta["val"].shape) for k, g in self.aot if k == kind
                for n in g.graph.nodes if n.target in ops]


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per Python function, across models: each test starts and ends with none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
