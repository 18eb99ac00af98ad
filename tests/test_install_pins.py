"""The GPU install pins vLLM to the version the installed Ray's LLM APIs were built and tested with."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import distribution
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ray_llm_vllm_pin() -> str:
    """The exact ``vllm`` version in the installed Ray's ``llm`` extra (its wheel's METADATA)."""
    requires = distribution("ray").metadata.get_all("Requires-Dist") or []
    pins = [m.group(1) for r in requires if 'extra == "llm"' in r
            for m in [re.match(r"vllm(?:\[[^\]]*\])?\s*==\s*([^\s;]+)", r)] if m]
    assert len(pins) == 1, f"expected one exact vllm pin in ray's llm extra, found {pins}: {requires}"
    return pins[0]


def test_the_gpu_extra_pins_the_vllm_ray_was_tested_with():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert distribution("ray").version == "2.60.0"
    extra = pyproject["project"]["optional-dependencies"]["vllm"]
    assert extra == [f"vllm=={_ray_llm_vllm_pin()}"], extra
    assert f"vllm=={_ray_llm_vllm_pin()}" in (ROOT / "README.md").read_text()
