"""Fine-tune the student on the corpus as a Ray job → <output_dir>/student/ (`raydistill train`).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py CONFIG [--set dotted.key=value ...]

Same arguments and behaviour as `raydistill train`, whose log names the absolute output location.
"""

from _common import run

if __name__ == "__main__":
    run("train")
