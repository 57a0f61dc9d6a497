"""The fast path as the training loop applies it, for tests: the model's family looked up in the catalogue,
FastPathOptions from keywords, checkpointing read off the model (as `tunery train` passes its setting).

    fast = fast_path(model, "cpu", allow_cpu=True, compile=False)
"""

from __future__ import annotations


def fast_path(model, device: str, *, enabled: bool = True, distributed: bool = False, packing: bool = False,
              **options):
    from tunery.kernels.apply import fast_path_for
    from tunery.kernels.options import FastPathOptions
    from tunery.models.catalog import family_of_model

    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    return fast_path_for(model, device, family_of_model(model), FastPathOptions(**options), enabled=enabled,
                         distributed=distributed, packing=packing, checkpointing=checkpointing)
