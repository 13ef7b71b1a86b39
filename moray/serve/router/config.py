"""regions.yaml: the router's own settings and the regions behind it, validated with pydantic.

    router:
      region: us-east              # the router's own region: preferred when a client names none
      api_keys_file: null          # clients' keys (MORAY_API_KEYS adds more), as the endpoint's
    regions:
      - {name: us-east, url: http://10.0.0.1:8000, location: virginia, weight: 2}
      - {name: eu-west, url: https://eu.example.com, location: dublin, api_key_env: MORAY_EU_KEY}

Unknown keys are errors that name the key and the allowed ones (the same formatter as the
moray config's). A region's upstream API key, which the router sends as `Authorization:
Bearer` (clients' own keys stop at the router), comes from the environment variable named
by `api_key_env` (read when the file is loaded, so a missing one fails at start), or
inline as `api_key` (kept out of every log and `repr`, but then the file is a secret).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from moray.platform.config import ConfigError, _format_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BreakerSettings(_Strict):
    failures: int = Field(3, ge=1)  # failures in a row that open a closed breaker
    cool_down_s: float = Field(10.0, gt=0)  # how long it stays open before a trial (half-open)
    successes: int = Field(2, ge=1)  # successes in half-open that close it again
    trials: int = Field(1, ge=1)  # requests let through at once while half-open


class AffinitySettings(_Strict):
    # Requests whose prompt (or messages) share their first prefix_chars characters (prefix_tokens
    # for token-id prompts) go where the first was served, so its prefix cache hits; shorter ones
    # have no "long prefix" and are routed on load alone.
    prefix_chars: int = Field(256, ge=1)
    prefix_tokens: int = Field(64, ge=1)
    max_entries: int = Field(100_000, ge=1)  # prefixes and sessions remembered (least recently used go first)
    ttl_s: float = Field(600.0, gt=0)  # a prefix or session not seen for this long is forgotten


class RouterSettings(_Strict):
    region: str  # the router's own region (a region's name or location)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    api_keys_file: Optional[str] = None  # clients' keys, one per line; MORAY_API_KEYS (comma-separated) adds more
    max_request_bytes: int = Field(1 << 20, ge=1)  # a larger body is refused (413) before it is parsed
    probe_interval_s: float = Field(1.0, gt=0)  # each region's /health and /metrics, this often
    probe_timeout_s: float = Field(2.0, gt=0)
    latency_alpha: float = Field(0.3, gt=0, le=1)  # weight of a new probe's round trip in the latency EWMA
    latency_budget_ms: float = Field(200.0, gt=0)  # regions slower than this are tried after all nearer ones
    queue_threshold: float = Field(16, ge=0)  # waiting sequences (moray:num_requests_waiting) = saturated
    kv_threshold: float = Field(0.95, gt=0, le=1)  # KV-cache use (moray:kv_cache_usage_perc) = saturated
    saturated_hold_s: float = Field(1.0, ge=0)  # after a 429 without Retry-After, skip the region this long
    request_deadline_s: float = Field(300.0, gt=0)  # a request's attempts (retries, resumes) end here
    connect_timeout_s: float = Field(2.0, gt=0)  # to open a connection to a region
    stream_idle_timeout_s: float = Field(60.0, gt=0)  # a stream silent this long counts as cut
    hedge_after_ms: Optional[float] = Field(None, gt=0)  # non-streamed: also ask the next region after this; None = off
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    affinity: AffinitySettings = Field(default_factory=AffinitySettings)


class RegionSpec(_Strict):
    name: str = Field(min_length=1)
    url: str  # the region's moray Serve endpoint (the address clients would use without the router)
    location: str = ""  # a label (a city, a cloud zone); a client's x-moray-region may name it
    weight: float = Field(1.0, gt=0)  # share of load: a region of weight 2 counts as half as busy
    api_key: Optional[SecretStr] = None  # upstream key inline (prefer api_key_env)
    api_key_env: Optional[str] = None  # the environment variable holding the upstream key

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("a region's url starts with http:// or https:// (the endpoint's address, e.g. "
                             "http://10.0.0.1:8000)")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _one_key_source(self):
        if self.api_key is not None and self.api_key_env:
            raise ValueError(f"region {self.name}: give api_key or api_key_env, not both")
        return self

    def upstream_key(self, environ=os.environ) -> Optional[str]:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return environ.get(self.api_key_env)
        return None


class RegionsConfig(_Strict):
    router: RouterSettings
    regions: List[RegionSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self):
        names = [r.name for r in self.regions]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"region names must be unique; {', '.join(twice)} appears more than once")
        labels = set(names) | {r.location for r in self.regions if r.location}
        if self.router.region not in labels:
            raise ValueError(f"router.region {self.router.region!r} is neither a region's name nor its location "
                             f"(names: {', '.join(names)})")
        return self

    def upstream_keys(self, environ=os.environ) -> Dict[str, Optional[str]]:
        """{region name: upstream key}; an api_key_env that is not set is an error now, not a 401 later."""
        keys = {}
        for i, r in enumerate(self.regions):
            if r.api_key_env and not environ.get(r.api_key_env):
                raise ConfigError(f"regions.{i}.api_key_env: {r.api_key_env} is not set in the environment; export "
                                  f"region {r.name}'s API key there, or leave api_key_env out if it has none")
            keys[r.name] = r.upstream_key(environ)
        return keys


def build_regions(raw) -> RegionsConfig:
    if not isinstance(raw, dict):
        raise ConfigError("a regions file is a mapping with two sections: router and regions")
    try:
        return RegionsConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, RegionsConfig).replace("invalid config", "invalid regions file")) from None


def load_regions(path: str | Path) -> RegionsConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"regions file {p} not found; configs/regions-example.yaml shows its shape")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return build_regions(raw)
