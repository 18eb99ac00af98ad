"""Serving benchmark (issue 8): teacher vs student through the running `raydistill serve` endpoint,
and what Serve adds over the same engine in-process.

    raydistill serve CONFIG &                                  # first: the endpoint (models teacher, student)
    .venv/bin/python benchmarks/serve_ab.py CONFIG [--set dotted.key=value ...]

The same code as `raydistill bench-serve CONFIG` (``raydistill.serve.bench.run_bench``); the
settings are ``serve.bench.*`` of the config (concurrency levels, requests per level, max_tokens,
the corpus split whose prompts are sent, overhead requests) and ``serve.host``/``serve.port``.

Per concurrency level and arm: p50/p95/p99 latency, time to first token p50/p95, requests/s,
output tokens/s (from the streamed ``usage``), errors; student/teacher ratios per level; the
overhead = served p50 / in-process p50 latency of the student, one request at a time (target ≤ 1.05,
reported, not asserted). Written to ``<output_dir>/bench/``: serve.md, serve.json, serve.png,
config.yaml. Progress goes to stderr; the last line printed is one JSON object with ``overhead``,
``latency_ratio`` and ``throughput_ratio`` (at the highest concurrency level, ``ratio_level``),
``per_level`` (both ratios at every level) and the raw figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="run config (YAML)")
    parser.add_argument("--set", "-s", dest="sets", action="append", default=[],
                        help="override: dotted.key=value (repeatable)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import logging

    from raydistill.config import ConfigError, load
    from raydistill.serve.bench import run_bench, summary_line
    from raydistill.serve.client import EndpointError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        result = run_bench(load(args.config, args.sets))
    except (ConfigError, EndpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {result['files']['markdown']}", file=sys.stderr)
    print(summary_line(result), flush=True)
    return 0


if __name__ == "__main__":  # vLLM's engine process re-imports this module
    sys.exit(main())
