"""The CLI and config import without the heavy stack (vllm, torch, transformers, ray)."""

import json
import subprocess
import sys


def test_cli_import_stays_light():
    code = ("import sys, json, raydistill.cli, raydistill.config, raydistill.schema, raydistill.data;"
            "print(json.dumps([m for m in ('vllm', 'torch', 'transformers', 'ray') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
