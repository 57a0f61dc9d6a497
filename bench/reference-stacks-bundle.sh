#!/bin/bash
# Builds .whl/reference-stacks.tgz: the packages the GPU machine lacks to run the reference stacks
# (Unsloth, HF+PEFT+bitsandbytes, liger-kernel, trl, datasets), pruned to fit one device call (<64 MiB).
# Run from the project root on the CPU machine:  bash bench/reference-stacks-bundle.sh
# Then on the device:  mkdir -p /tmp/site && tar xzf .whl/reference-stacks.tgz -C /tmp/site && export PYTHONPATH=/tmp/site
# (carry ".whl"; keep "/.whl/" in .git/info/exclude). Versions fit the GPU image: torch 2.11, transformers 5.17, Python 3.12.
set -euo pipefail
out=${1:-.whl}
tmp=$(mktemp -d)
pipdl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$tmp/w" "$@"; }
pipdl unsloth==2026.10.9 unsloth_zoo==2026.10.9 "bitsandbytes==0.50.2" "trl==1.15.0" "datasets==4.8.5" \
  "torchao==0.18.0" cut_cross_entropy hf_transfer json5 nest_asyncio structlog msgspec pydantic pydantic_core \
  annotated_types typing_inspection tyro docstring_parser typeguard shtab dill multiprocess "liger-kernel==0.8.5"
mkdir -p "$tmp/site"
for w in "$tmp"/w/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
# prune what the GPU image (CUDA 13.0) never loads: Unsloth Studio's web assets, other CUDA builds of bitsandbytes
rm -rf "$tmp/site/studio" "$tmp/site/test"
find "$tmp/site/bitsandbytes" -name 'libbitsandbytes_cuda*.so' ! -name '*cuda130*' -delete
mkdir -p "$out"
tar czf "$out/reference-stacks.tgz" -C "$tmp/site" .
rm -rf "$tmp"
ls -la "$out/reference-stacks.tgz"
