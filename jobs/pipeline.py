"""The whole pipeline as a Ray job: generate → train → evaluate (`raydistill run`).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pipeline.py CONFIG [--set dotted.key=value ...] [--overwrite]

Same arguments and behaviour as `raydistill run`, whose log names the absolute output location.
"""

from _common import run

if __name__ == "__main__":
    run("run")
