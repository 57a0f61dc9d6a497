"""The package's layering, read off its imports (docs/architecture.md):

- kernels/ imports nothing of tunery outside itself (the training loop hands it the family and the options);
- train/ never imports eval/;
- eval/, export/ and cli/ reach training only through its public API (`from tunery.train import ...`) and
  the run folder only through tunery/run.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tunery"


def _imports(package: str) -> list[tuple[str, str, list[str]]]:
    """(file, module imported, names imported) of every tunery import in tunery/<package>/, lazy ones too."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunery"):
                out.append((path.name, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                out += [(path.name, a.name, []) for a in node.names if a.name.startswith("tunery")]
    return out


def test_kernels_import_nothing_outside_kernels():
    outside = [i for i in _imports("kernels") if not i[1].startswith("tunery.kernels")]
    assert not outside, outside


def test_train_never_imports_eval():
    assert not [i for i in _imports("train") if i[1].startswith("tunery.eval")]


def test_eval_export_cli_use_only_the_public_training_api():
    for package in ("eval", "export", "cli"):
        for file, module, names in _imports(package):
            assert not module.startswith("tunery.train."), (package, file, module)
            if module == "tunery.train":
                assert set(names) <= {"train", "held_out_loss"}, (package, file, names)


def test_the_public_training_api_is_what_it_says():
    import tunery.train

    assert sorted(tunery.train.__all__) == ["held_out_loss", "train"]
    assert all(callable(getattr(tunery.train, name)) for name in tunery.train.__all__)


def test_the_web_console_holds_no_training_logic():
    """server/ calls data, jobs, eval, export and the run folder; training itself only ever runs as a job."""
    reached = [i for i in _imports("server") if i[1].startswith(("tunery.train", "tunery.kernels"))]
    assert not reached, reached


def test_the_advisor_predicts_and_never_trains():
    """advisor/ reads the catalogue, flavors, data and run folders and queues jobs; training and the fast path
    reach it only as numbers calibrated on the bench."""
    reached = [i for i in _imports("advisor") if i[1].startswith(("tunery.train", "tunery.kernels"))]
    assert not reached, reached
