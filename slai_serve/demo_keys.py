"""The local demo key file: one paying and one free API key, so ``up`` serves two tiers out of the box.

``slai-serve up`` (without ``--api-keys``) hands the gateway this file, and
``slai-serve bench-serve`` (without ``--api-keys`` / ``--paying-key`` / ``--free-key``)
sends each request with its tier's key from it, so the workload's paying / free
split reaches the scheduler. Requests without a key still get the paying tier
(``allow_anonymous``), exactly as without a key file, so ``slai-serve client``
and curl keep working unchanged.

The file is created once, with random keys, readable by its owner only, at
``$SLAI_DEMO_KEYS`` or ``~/.cache/slai-serve/demo-keys.json``; it is for a local
stack, not a deployment (docs/gateway.md, *API keys and tiers*).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

DEMO_KEYS_ENV = "SLAI_DEMO_KEYS"


def demo_keys_path() -> Path:
    """Where the demo key file lives (``$SLAI_DEMO_KEYS`` overrides)."""
    env = os.environ.get(DEMO_KEYS_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "slai-serve" / "demo-keys.json"


def demo_key_data() -> dict:
    """A fresh key file's content: one random key per tier, anonymous requests paying."""
    return {"keys": {f"sk-demo-paying-{secrets.token_urlsafe(18)}": "paying",
                     f"sk-demo-free-{secrets.token_urlsafe(18)}": "free"},
            "allow_anonymous": True, "default_tier": "paying"}


def ensure_demo_keys(path: str | os.PathLike | None = None) -> Path:
    """The demo key file, written first if it does not exist yet (atomically, mode 0600)."""
    p = Path(path) if path is not None else demo_keys_path()
    if p.is_file():
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(demo_key_data(), fh, indent=2)
        fh.write("\n")
    # NOTE: rename, not write in place: two `up`s starting together never see half a file; the second one's
    # rename wins and both then read the same complete file (the gateway reads it after this returns)
    os.replace(tmp, p)
    return p
