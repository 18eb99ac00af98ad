"""The whole pipeline as a Ray job: generate → train → evaluate (`raydistill run`).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pipeline.py CONFIG [--set dotted.key=value ...] [--overwrite]

Same arguments and behaviour as `raydistill run`, whose log names the absolute output location.
Resubmitting after a failure redoes nothing finished: a stage whose output is complete and was
made from the same settings and inputs is skipped (a log line names it), one made with other
settings is refused with the differences, and `--overwrite` makes every stage again.
"""

from _common import run

if __name__ == "__main__":
    run("run")
