"""The teacher answers the prompts as a Ray job → <output_dir>/corpus/ (`raydistill generate`).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/generate.py CONFIG [--set dotted.key=value ...] [--overwrite]

Same arguments and behaviour as `raydistill generate`, whose log names the absolute output location.
"""

from _common import run

if __name__ == "__main__":
    run("generate")
