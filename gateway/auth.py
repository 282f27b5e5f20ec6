"""API keys -> tiers. A client can never choose its tier: its key does.

The key file is JSON or YAML, in one of two shapes::

    # flat: key -> tier
    {"sk-paying-1": "paying", "sk-free-1": "free"}

    # structured: keys plus per-tier objectives
    keys: {sk-paying-1: paying, sk-free-1: free}
    tiers:
      paying: {tbt_slo_s: 0.1, ttft_slo_s: 1.0}
      free:   {tbt_slo_s: 0.5}
    allow_anonymous: false      # true: requests without a key get default_tier
    default_tier: free

Without a key file everyone gets the default tier and keys are ignored. With
one, an unknown key is rejected (UNAUTHENTICATED / 401), and so is a missing key
unless ``allow_anonymous`` is set. The gateway follows the file while it runs
(:mod:`gateway.key_file`).

A presented key is never compared with the stored ones byte by byte: the store
is indexed by each key's SHA-256 digest, so how long a look-up takes depends
only on the digest of the guess, which tells an attacker nothing about any
real key; the matching digest is then confirmed with ``hmac.compare_digest``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import TIER_NAMES, TierPolicy, default_tier_policies, parse_tier


class Unauthenticated(Exception):
    """Missing or unknown API key (gRPC UNAUTHENTICATED, HTTP 401)."""


def key_digest(key: str) -> bytes:
    """SHA-256 of an API key: what the store is indexed by."""
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class KeyStore:
    keys: dict[str, str] = field(repr=False)  # api key -> tier name (repr=False: no secrets in logs)
    tiers: dict[str, TierPolicy]  # tier name -> objectives
    default_tier: str = "paying"
    enabled: bool = False  # False: no key file, everyone gets default_tier
    allow_anonymous: bool = False  # with a key file: requests without a key get default_tier
    # key digest -> (the same digest, tier name); resolve() looks keys up here, never in ``keys``
    by_digest: dict[bytes, tuple[bytes, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_digest", {d: (d, t) for d, t in
                                               ((key_digest(k), t) for k, t in self.keys.items())})

    def resolve(self, authorization: str | None) -> TierPolicy:
        """The tier policy for an ``Authorization`` value (``Bearer K`` or ``K``)."""
        if not self.enabled:
            return self.tiers[self.default_tier]
        key = bearer_token(authorization)
        if not key:
            if self.allow_anonymous:
                return self.tiers[self.default_tier]
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        presented = key_digest(key)
        stored, tier = self.by_digest.get(presented, (b"", ""))
        if not hmac.compare_digest(stored, presented):
            raise Unauthenticated("unknown API key")
        return self.tiers[tier]

    def key_for_tier(self, tier: str) -> str | None:
        """Some key of ``tier`` (load generators use it to send per-tier traffic)."""
        return next((k for k, t in self.keys.items() if t == tier), None)


def bearer_token(value: str | None) -> str:
    if not value:
        return ""
    value = value.strip()
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return value


def open_store(default_tier: str = "paying", tiers: dict[str, TierPolicy] | None = None) -> KeyStore:
    """No key file: everyone gets ``default_tier``."""
    return KeyStore(keys={}, tiers=dict(tiers or default_tier_policies()), default_tier=parse_tier(default_tier))


def parse_key_data(data: Any, default_tier: str = "paying",
                   tiers: dict[str, TierPolicy] | None = None) -> KeyStore:
    """Build a :class:`KeyStore` from the parsed key file (either shape)."""
    if not isinstance(data, dict):
        raise ValueError("key file: expected a mapping of key -> tier (or a 'keys' section)")
    tier_policies = dict(tiers or default_tier_policies())
    allow_anonymous = False
    if "keys" in data and isinstance(data["keys"], dict):
        raw_keys = data["keys"]
        for name, spec in (data.get("tiers") or {}).items():
            name = parse_tier(name)
            if not isinstance(spec, dict):
                raise ValueError(f"key file: tiers.{name} must be a mapping")
            unknown = set(spec) - {"tbt_slo_s", "ttft_slo_s"}
            if unknown:
                raise ValueError(f"key file: tiers.{name}: unknown fields {sorted(unknown)}")
            tier_policies[name] = dataclasses.replace(
                tier_policies[name], **{k: float(v) for k, v in spec.items()})
        allow_anonymous = bool(data.get("allow_anonymous", False))
        default_tier = parse_tier(data.get("default_tier", default_tier))
    else:
        raw_keys = data
    keys: dict[str, str] = {}
    for key, tier in raw_keys.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError("key file: keys must be non-empty strings")
        keys[key.strip()] = parse_tier(tier)
    return KeyStore(keys=keys, tiers=tier_policies, default_tier=parse_tier(default_tier), enabled=True,
                    allow_anonymous=allow_anonymous)


def load_key_file(path: str | Path, default_tier: str = "paying",
                  tiers: dict[str, TierPolicy] | None = None) -> KeyStore:
    """Read a JSON (``.json``) or YAML key file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    return parse_key_data(data, default_tier=default_tier, tiers=tiers)


__all__ = ["KeyStore", "Unauthenticated", "TIER_NAMES", "bearer_token", "load_key_file", "open_store",
           "parse_key_data"]
