# Source on the GPU machine (repo root, `.whl` carried): puts the reference stacks and tunery's missing
# dependencies on PYTHONPATH.   . bench/gpu_env.sh && python bench/lora_bench.py --rows llama-1b
# .whl/reference-stacks.tgz: bash bench/reference-stacks-bundle.sh
# .whl/deps/*.whl: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/deps \
#   typer click rich markdown-it-py mdurl pygments shellingham pytest pluggy iniconfig xxhash fsspec   (about 3 MB)
mkdir -p /tmp/site
[ -f /tmp/site/.unpacked ] || {
  tar xzf .whl/reference-stacks.tgz -C /tmp/site
  for w in .whl/deps/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
  # byte-compiled as pip install leaves them: no stack's first import pays for compiling its sources
  python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1
  touch /tmp/site/.unpacked
}
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
