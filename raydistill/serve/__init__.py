"""``raydistill serve``: teacher and student side by side behind one OpenAI-compatible A/B endpoint
on Ray Serve (``ray.serve.llm`` deployments running vLLM, and our A/B ingress).

- ``raydistill.serve.app``: ``build_app(cfg)`` (the Serve application), ``app_builder(args)`` (the
  entry point a Serve config file names) and ``serve_problems(cfg)`` (refusals before starting).
  Importing it stays light; Ray and vLLM load when an app is built.
- ``raydistill.serve.lifecycle``: ``raydistill serve`` in this process: start Serve, wait for Ctrl-C or
  SIGTERM, shut down.
- ``raydistill.serve.routing``: the A/B rule ``pick_arm`` and the metrics' ``request_via``.
- ``raydistill.serve.access``: the API-key rules and the decision on a request's key (``auth_problem``).
- ``raydistill.serve.ingress``: ``ABIngress``, the ``OpenAiIngress`` subclass that routes
  ``model: "ab"`` and names the answering arm (imports ``ray.serve.llm``, hence vLLM).
- ``raydistill.serve.client``: the client of the OpenAI API (endpoint checks, streamed and timed chat
  completions) that bench-serve and evaluate use.
- ``raydistill.serve.bench``: ``raydistill bench-serve``, the load benchmark of a running endpoint.

The contract shared with clients: model ids ``ARMS`` + ``AB_MODEL``; the ``ARM_HEADER`` response
header (and the body's ``model`` field) names the arm that answered.
"""

ARMS = ("teacher", "student")
AB_MODEL = "ab"
ARM_HEADER = "x-raydistill-arm"
