"""Load-test the running A/B endpoint as a Ray job → <output_dir>/bench/ (`raydistill bench-serve`).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/bench_serve.py CONFIG [--set dotted.key=value ...]

Same arguments and behaviour as `raydistill bench-serve`, whose log names the absolute output location:
the report goes to <output_dir>/bench/ on S3 like every other stage's outputs (the corpus prompts are
read from there too). With serve.api_key_env set, the variable must hold the endpoint's key here.
"""

from _common import run

if __name__ == "__main__":
    run("bench-serve")
