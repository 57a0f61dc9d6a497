"""A giant row is cut before it is tokenized: memory stays bounded by max_seq_len, the tokens kept are the
ones a full tokenization gives, and the report names the rows that were cut."""

from __future__ import annotations

import json
import subprocess
import sys

from tunery.data.tokenize import tokenize_example


def test_cutting_before_tokenizing_keeps_the_same_first_tokens(tmp_path):
    from tunery.models.tiny import train_tokenizer

    tok = train_tokenizer(["hello world, the quick brown fox " * 20], 400)
    example = {"messages": [{"role": "user", "content": "repeat " * 2000},
                            {"role": "assistant", "content": "the quick brown fox " * 500}]}
    full = tok(tok.apply_chat_template(example["messages"], tokenize=False), add_special_tokens=False)
    got = tokenize_example(tok, example, 64)
    assert got.truncated and got.input_ids == full["input_ids"][:64]


_INSPECT = """
import json, resource, sys
from tunery.data.inspect import inspect_file
from tunery.models.tiny import train_tokenizer
tok = train_tokenizer(["a b c d e f"], 300)
insp = inspect_file(sys.argv[1], tok, max_seq_len=128)
print(json.dumps({"too_long_rows": insp.too_long_rows, "warnings": insp.warnings,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_a_50_mb_row_is_inspected_in_bounded_memory(tmp_path):
    path = tmp_path / "giant.jsonl"
    small = {"prompt": "p", "completion": "c"}
    with open(path, "w") as fh:
        fh.write(json.dumps(small) + "\n")
        fh.write(json.dumps({"prompt": "a b c " * (50 * 2**20 // 6), "completion": "c"}) + "\n")
        fh.write(json.dumps(small) + "\n")
    out = subprocess.run([sys.executable, "-c", _INSPECT, str(path)], capture_output=True, text=True, timeout=600,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TUNERY_HOME": str(tmp_path / "h")})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["too_long_rows"] == [2] and "(rows 2)" in " ".join(report["warnings"])
    assert report["peak_mib"] < 2048, report["peak_mib"]
