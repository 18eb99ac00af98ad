"""Who may use the endpoint of ``raydistill serve``: the API-key rules (no key only on a loopback
address, ``api_key_problem``; the digest the ingress compares against, ``api_key_digest``) and the
decision on one request's ``Authorization`` header (``auth_problem``, applied by
``serve.ingress.BearerAuth``). Light (standard library and the config); it sends no answers.
"""

from __future__ import annotations

import hashlib

from ..config import Config


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable only from this machine: ``localhost`` or a loopback address
    (127.0.0.0/8, ::1). ``0.0.0.0`` and ``::`` (every interface) are not."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def api_key_problem(cfg: Config) -> str | None:
    """Why ``cfg`` may not serve as it stands (None when it may): no ``serve.api_key_env`` while
    ``serve.host`` is not a loopback address (anyone who reaches the host could use the models), or
    an ``api_key_env`` that names an unset or empty environment variable."""
    import os

    name = cfg.serve.api_key_env
    if name is None:
        if is_loopback(cfg.serve.host):
            return None
        return (f"serve.host is {cfg.serve.host}, reachable from other machines, and serve.api_key_env is not set: "
                "the endpoint would answer anyone. Set serve.api_key_env to the name of an environment variable "
                "holding a key (e.g. --set serve.api_key_env=RAYDISTILL_SERVE_KEY with "
                "export RAYDISTILL_SERVE_KEY=$(openssl rand -hex 32)); clients send `Authorization: Bearer <key>`. "
                "Without a key, bind to 127.0.0.1")
    if not os.environ.get(name, "").strip():
        return (f"serve.api_key_env: environment variable {name} is not set (or empty); export it where the "
                f"app is built (export {name}=...), or set serve.api_key_env=null on a 127.0.0.1 endpoint")
    return None


def api_key_digest(cfg: Config) -> str | None:
    """SHA-256 (hex) of the key in ``serve.api_key_env``, None when no key is set: what the ingress
    compares requests against (the key itself never leaves this process). Raises ValueError with
    ``api_key_problem``'s message when the setting or the variable is missing."""
    import os

    problem = api_key_problem(cfg)
    if problem:
        raise ValueError(problem)
    name = cfg.serve.api_key_env
    return hashlib.sha256(os.environ[name].strip().encode()).hexdigest() if name else None


def auth_problem(authorization: str | None, key_digest: str | None) -> str | None:
    """The decision on one request: None lets it through, else the message of its 401 answer.

    ``authorization``: the request's ``Authorization`` header (None when absent); ``key_digest``:
    ``api_key_digest`` (None = no key required: everything passes). The header must be
    ``Bearer <key>`` (scheme case-insensitive) with the key whose SHA-256 is ``key_digest``
    (compared in constant time). The message never repeats what the client sent."""
    import hmac

    if key_digest is None:
        return None
    if not authorization or not authorization.strip():
        return ("missing API key: send the header `Authorization: Bearer <key>` with the key of this endpoint "
                "(the openai client's api_key)")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "malformed Authorization header: expected `Authorization: Bearer <key>`"
    given = hashlib.sha256(token.strip().encode()).hexdigest()
    if not hmac.compare_digest(given, key_digest):
        return "invalid API key: the key sent is not this endpoint's key"
    return None
