"""Serve teacher and student side by side (OpenAI API, A/B model `ab`) as a Ray job (`raydistill serve`).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/serve.py CONFIG --set serve.host=0.0.0.0 --set serve.api_key_env=RAYDISTILL_SERVE_KEY \
        [--set dotted.key=value ...]

Off 127.0.0.1 the endpoint needs a key: RAYDISTILL_SERVE_KEY must be set in the job driver's
environment (on the head node, or in the runtime env's env_vars as cluster/runtime_env.yaml passes
DEEPSEEK_API_KEY); clients send `Authorization: Bearer <key>`.

Same arguments and behaviour as `raydistill serve`: the application runs while the job runs.
`ray job stop JOB_ID` sends SIGTERM, which takes the command's Ctrl-C path: the application is
deleted (only it; Serve and the cluster stay) and the job ends. Ray gives a stopped job
RAY_JOB_STOP_WAIT_TIME_S (default 3 s) before SIGKILL, which leaves the application running:
raise it on the cluster, or `serve delete`. For an endpoint that outlives any job use
cluster/serve.yaml (`serve deploy`) or the KubeRay RayService (cluster/rayservice.yaml).
"""

import signal

from _common import run


def _interrupt(signum, frame):  # SIGTERM (ray job stop) → the CLI's KeyboardInterrupt clean-up
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    run("serve")
