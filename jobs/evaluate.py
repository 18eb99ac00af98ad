"""Compare teacher, baseline and distilled student as a Ray job → <output_dir>/eval/ (`raydistill evaluate`).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/evaluate.py CONFIG [--set dotted.key=value ...]

Same arguments and behaviour as `raydistill evaluate`, whose log names the absolute output location.
"""

from _common import run

if __name__ == "__main__":
    run("evaluate")
