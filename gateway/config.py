"""Gateway configuration: frozen dataclasses, validated on construction, no I/O.

Tiers: a tier is a named pair of objectives (TBT, optional
TTFT) that the gateway stamps on every request it forwards. The client never
chooses its tier: the API key does (:mod:`gateway.auth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.tiers import FREE_TBT_S, PAYING_TBT_S, Tier

TIER_NAMES: dict[str, Tier] = {"paying": Tier.PAYING, "free": Tier.FREE}
POOL_ROUTING_RULES = ("jsw", "p2c", "round-robin")  # gateway/pools.py


@dataclass(frozen=True, slots=True)
class TierPolicy:
    """Objectives of one tier, in seconds (0 = the scheduler's default)."""

    tier: Tier = Tier.PAYING
    tbt_slo_s: float = field(default=PAYING_TBT_S, metadata={"help": "time-between-tokens objective"})
    ttft_slo_s: float = field(default=0.0, metadata={"help": "time-to-first-token objective; 0 = scheduler default"})

    def __post_init__(self) -> None:
        if self.tbt_slo_s < 0 or self.ttft_slo_s < 0:
            raise ValueError(f"tier {self.tier.name.lower()}: SLOs must be >= 0")


def default_tier_policies() -> dict[str, TierPolicy]:
    """The paper's two tiers: paying 0.1 s TBT, free 0.5 s TBT."""
    return {"paying": TierPolicy(Tier.PAYING, PAYING_TBT_S), "free": TierPolicy(Tier.FREE, FREE_TBT_S)}


def parse_tier(name: str) -> str:
    """Normalise a tier name; ValueError for unknown ones."""
    low = str(name).strip().lower()
    if low not in TIER_NAMES:
        raise ValueError(f"unknown tier {name!r}; choose from {', '.join(TIER_NAMES)}")
    return low


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    scheduler_address: str = field(default="127.0.0.1:50061", metadata={"help": "scheduler host:port"})
    pools: tuple[str, ...] = field(default=(), metadata={
        "help": "schedulers (pools) to route across; empty = the one at scheduler_address"})
    pool_routing: str = field(default="jsw", metadata={"help": "jsw | p2c | round-robin (gateway/pools.py)"})
    pools_dns: str = field(default="", metadata={
        "help": "name:port that --pools named: re-resolved every 30 s, pools follow its addresses"})
    grpc_address: str = field(default="127.0.0.1:50051", metadata={"help": "gRPC listen address"})
    http_host: str = field(default="127.0.0.1", metadata={"help": "HTTP listen host"})
    http_port: int = field(default=8000, metadata={"help": "HTTP listen port; 0 = pick one, -1 = no HTTP"})
    model_dir: str = field(default="", metadata={"help": "folder with tokenizer.json, config.json, chat template"})
    model_name: str = field(default="", metadata={"help": "served model id; default: the folder's name"})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request gives none"})
    max_concurrent_requests: int = field(default=1024, metadata={"help": "in-flight requests before 429"})
    max_model_len: int = field(default=0, metadata={"help": "prompt + max_tokens limit; 0 = from config.json"})
    request_timeout_s: float = field(default=3600.0, metadata={"help": "a request still running this long after it reached the gateway is aborted"
                                                      " (gRPC DEADLINE_EXCEEDED, HTTP 504)"})
    drain_timeout_s: float = field(default=10.0, metadata={"help": "grace for in-flight streams on SIGTERM"})
    health_interval_s: float = field(default=0.5, metadata={
        "help": "how often the gateway checks the scheduler's health (its own readiness follows it)"})
    stream_buffer_tokens: int = field(default=512, metadata={
        "help": "tokens read ahead of a client that is not reading, before the gateway stops reading"})
    stream_stall_timeout_s: float = field(default=30.0, metadata={
        "help": "abort a request whose client took nothing for this long with its buffer full; 0 = never"})
    default_tier: str = field(default="paying", metadata={"help": "tier of requests without a key file"})
    tiers: dict[str, TierPolicy] = field(default_factory=default_tier_policies)
    # NOTE: repr=False keeps the secret out of logs and tracebacks that print the config
    service_token: str = field(default="", repr=False, metadata={
        "help": "shared token sent on every scheduler call (wire.service_auth); '' = none"})
    # transport limits (docs/gateway.md, "Transport limits")
    max_body_bytes: int = field(default=4 << 20, metadata={"help": "largest HTTP body / gRPC message (413 / "
                                                                     "RESOURCE_EXHAUSTED above)"})
    header_timeout_s: float = field(default=10.0, metadata={"help": "an HTTP request's headers must arrive within"})
    body_timeout_s: float = field(default=30.0, metadata={"help": "an HTTP body must arrive within, after headers"})
    max_connections: int = field(default=2048, metadata={"help": "open HTTP connections before 503"})
    # NOTE: longer than common clients' own idle expiry (httpx, and so the openai client: 5 s), so a
    # client never sends a request on a connection the server is closing at that moment
    keep_alive_timeout_s: float = field(default=30.0, metadata={"help": "an idle keep-alive connection closes after"})

    def __post_init__(self) -> None:
        parse_tier(self.default_tier)
        if self.pool_routing not in POOL_ROUTING_RULES:
            raise ValueError(f"pool_routing must be one of {', '.join(POOL_ROUTING_RULES)}, got {self.pool_routing!r}")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if not self.health_interval_s > 0:
            raise ValueError(f"health_interval_s must be > 0, got {self.health_interval_s}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.stream_buffer_tokens < 1:
            raise ValueError("stream_buffer_tokens must be >= 1")
        if not self.stream_stall_timeout_s >= 0:  # also rejects NaN
            raise ValueError("stream_stall_timeout_s must be >= 0 (0 = never abort)")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("header_timeout_s and body_timeout_s must be > 0")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not self.keep_alive_timeout_s > 0:
            raise ValueError("keep_alive_timeout_s must be > 0")
        for name in TIER_NAMES:
            if name not in self.tiers:
                raise ValueError(f"tier {name!r} has no policy")

    @property
    def pool_addresses(self) -> tuple[str, ...]:
        """The schedulers this gateway routes across (one: ``scheduler_address``)."""
        return tuple(self.pools) or (self.scheduler_address,)
