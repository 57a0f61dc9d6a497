"""A tiny PEFT LoRA model whose adapters already act (B is not zero), for the kernel tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_lora(tiny_tokenizer):
    """tiny_lora(family, num_layers, dropout) -> a fresh seeded LoRA model (r 4, alpha 8) on the session tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunery.models.lora import apply_lora
    from tunery.models.tiny import TinySpec, make_config

    def build(family: str = "llama", num_layers: int = 2, dropout: float = 0.0):
        torch.manual_seed(0)
        spec = TinySpec(family=family, hidden_size=32, intermediate_size=64, num_layers=num_layers)
        model = apply_lora(AutoModelForCausalLM.from_config(make_config(spec, tiny_tokenizer)), 4, 8, dropout)
        for name, p in model.named_parameters():  # B starts at zero in PEFT; make the adapter do something
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        return model

    return build


@pytest.fixture
def loss_and_grads():
    """loss_and_grads(model, batch, fast) -> (summed loss, {trainable name: grad}) of one forward + backward."""
    from tunery.eval.loss import summed_loss

    def run(model, batch, fast=None):
        model.zero_grad(set_to_none=True)
        loss = summed_loss(model, batch, fast)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    return run
