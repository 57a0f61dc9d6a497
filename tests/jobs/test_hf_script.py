"""The hf-jobs script's dependency block: a run that needs bitsandbytes (a 4-bit base, the 8-bit optimizer) gets
the qlora extra's requirements; any other run installs no extra."""

from __future__ import annotations

import pytest
import tomllib

from tunery.config import RunConfig
from tunery.jobs.hf_jobs import make_script


def _deps(**settings) -> list[str]:
    cfg = RunConfig(model="org/model", data="org/dataset", name="job", **settings)
    text = make_script(cfg, tunery_spec="tunery==9.9")
    block = "\n".join(line[2:] for line in text.split("# /// script\n")[1].split("# ///")[0].splitlines())
    return tomllib.loads(block)["dependencies"]


@pytest.mark.parametrize("settings, needs", [({}, False), ({"method": "qlora"}, True),
                                             ({"optimizer": "adamw_8bit"}, True), ({"method": "full"}, False)])
def test_the_job_installs_bitsandbytes_exactly_when_the_run_needs_it(settings, needs):
    deps = _deps(**settings)
    assert deps[0] == "tunery==9.9" and any(d.startswith("transformers") for d in deps)
    assert any(d.startswith("bitsandbytes") for d in deps) == needs, deps
    assert not [d for d in deps if "extra" in d or d.startswith(("ray", "fastapi", "gguf"))], deps  # no markers
