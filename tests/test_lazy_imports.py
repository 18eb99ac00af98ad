"""The CLI and config import without the heavy stack (vllm, torch, transformers, ray)."""

import json
import subprocess
import sys


def test_cli_import_stays_light():
    code = ("import sys, json, raydistill.cli, raydistill.config, raydistill.schema, raydistill.data;"
            "print(json.dumps([m for m in ('vllm', 'torch', 'transformers', 'ray') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_ray_data_functions_of_training_import_no_torch():
    """tokenize_batch / trained_rows run in Ray Data tasks: a fresh task worker must not pay for
    importing torch (seconds each on a small machine) to filter rows."""
    code = ("import sys, json, raydistill.train.examples;"
            "print(json.dumps([m for m in ('vllm', 'torch') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
