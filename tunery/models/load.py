"""Load a causal LM and its tokenizer from a Hub id or a local folder, with errors that say what to do."""

from __future__ import annotations

import os
from pathlib import Path

from tunery.errors import ModelError
from tunery.hashing import sha256_files, sha256_json


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("device=cuda was asked for but torch sees no CUDA GPU (run `tunery doctor`)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    if device.startswith("cuda"):
        lean_cuda_allocator()
        keep_compile_caches()
    return device


COMPILE_CACHE_VARS = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"}


def keep_compile_caches() -> dict[str, str]:
    """Keep torch.compile's caches (inductor's compiled graphs and autograd graphs, Triton's kernels) under
    TUNERY_HOME/cache instead of /tmp, so the next run of the same model and shapes loads its compiled blocks
    instead of compiling them, after a reboot too. Never over a setting of the user's; returns what it set."""
    from tunery.paths import cache_dir

    chosen = {var: str(cache_dir(name)) for var, name in COMPILE_CACHE_VARS.items() if var not in os.environ}
    os.environ.update(chosen)
    return chosen


def remember_dynamic_shapes(config) -> str | None:
    """Let torch.compile remember between runs which sizes of the compiled code varied (torch's local
    profile-guided dynamic shapes, kept with the compile caches): a later run of the same model compiles the
    sequence length dynamic from its first call, instead of a static version for the first length and a dynamic
    one at the second. Keyed by the model's config (`config`: its dict), so that other models' sizes never turn
    this one's dimensions dynamic. Never over a job id of the user's; returns the key it set, or None."""
    import torch

    compiler_config = getattr(torch.compiler, "config", None)
    if compiler_config is None or not hasattr(compiler_config, "job_id") or compiler_config.job_id is not None:
        return None  # a torch without profile-guided shapes, or the user's own job id
    compiler_config.job_id = f"tunery-{sha256_json(config)[:16]}"
    return compiler_config.job_id


ALLOC_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.10 reads the first, older the second


def lean_cuda_allocator() -> bool:
    """Let the CUDA caching allocator grow segments instead of cutting new ones (`expandable_segments`), so long
    sequences' GiB-sized activations do not strand memory between fixed blocks. Only before CUDA starts, and
    never over a setting of the user's; True when set."""
    import torch

    if any(v in os.environ for v in ALLOC_VARS) or torch.cuda.is_initialized():
        return False
    os.environ["PYTORCH_ALLOC_CONF"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True


def pick_dtype(requested: str, device: str):
    import torch

    if requested == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]


def _explain(model: str, error: Exception) -> ModelError:
    local = Path(model).expanduser()
    if local.exists():
        return ModelError(f"{model}: the folder exists but is not a loadable model ({error}); it needs "
                          "config.json, weights (*.safetensors) and tokenizer files")
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_like_path:
        return ModelError(f"{model}: no such folder")
    return ModelError(
        f"cannot load '{model}' from the Hugging Face Hub ({type(error).__name__}: {error}). If this machine "
        f"is offline, download the model elsewhere (`hf download {model} --local-dir DIR`), copy DIR here "
        f"and pass --model DIR; if the repo is gated, set HF_TOKEN")


def load_tokenizer(model: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _explain(model, e) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{model}: tunery needs a fast (tokenizers-backed) tokenizer to locate answer tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def embedding_rows(model: str) -> int | None:
    """The model's embedding rows (its config's vocab_size; no weights loaded), or None when it cannot be read."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        return getattr(config.get_text_config(), "vocab_size", None)
    except (OSError, ValueError):
        return None


def four_bit_config(dtype):
    """NF4 with double quantization, computing in the model's dtype: the QLoRA recipe (train setup's
    `check_packages` has made sure bitsandbytes is installed)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_model(model: str, device: str, dtype, revision: str | None = None, trust_remote_code: bool = False,
               four_bit: bool = False):
    """The model on `device`; `four_bit` loads linear weights as NF4 (quantized while loading, on `device`)."""
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": four_bit_config(dtype), "device_map": {"": device}} if four_bit else {}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype,
                                                      trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise _explain(model, e) from None
    return loaded if four_bit else loaded.to(device)


def model_fingerprint(model: str, revision: str | None = None) -> dict:
    """What identifies the weights: the folder's config+weights hash, or the Hub id and revision.

    Hashing an 8B model's 16 GB takes about 10 s, so a folder's hash is kept in TUNERY_HOME/cache/fingerprints
    under what `stat` says of its files (names, sizes, modification times, inodes): a file written since has
    another key and is hashed again. The training loop computes it beside setup, in a thread."""
    import uuid

    from tunery.paths import cache_dir

    folder = Path(model).expanduser()
    if not folder.is_dir():
        return {"model": model, "revision": revision or "main"}
    resolved = str(folder.resolve())
    files = [(f.name, f) for f in sorted(folder.iterdir())
             if f.suffix in (".json", ".safetensors", ".bin", ".model") and f.is_file()]
    stats = [(name, f.stat()) for name, f in files]
    key = sha256_json([resolved, [(n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in stats]])
    kept = cache_dir("fingerprints") / f"{key}.txt"
    if kept.exists():
        digest = kept.read_text().strip()
    else:
        digest = sha256_files(files)
        tmp = kept.with_name(f"{kept.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(digest)
        os.replace(tmp, kept)
    return {"model": resolved, "folder_sha256": digest}


def grow_vocabulary(model, tokenizer) -> list[int]:
    """Give every token of `tokenizer` an embedding row: a tokenizer with tokens added after the model was made
    (chat or tool markers) is longer than the embeddings, and its new ids would index past them. The new rows
    start at the mean of the old ones (what transformers' `mean_resizing` does); returns their ids, which
    training makes trainable. Nothing changes when every token has a row."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return []
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return list(range(rows, len(tokenizer)))

