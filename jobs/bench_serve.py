"""Load-test the running A/B endpoint as a Ray job → <output_dir>/bench/ (`raydistill bench-serve`).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/bench_serve.py CONFIG [--set dotted.key=value ...]

Same arguments and behaviour as `raydistill bench-serve`, whose log names the absolute output location.
"""

from _common import run

if __name__ == "__main__":
    run("bench-serve")
