"""The policy file schema (version 1) as pydantic models.

Validation here is structural and per value (types, ranges, pattern syntax); the loader turns
pydantic's errors into messages with the file, line and key. Rule patterns are parsed once, by
the compiler, which reports their errors the same way.
"""

from __future__ import annotations

import ipaddress
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    model_validator,
)

from .paths import parse_path_glob
from .patterns import parse_pattern
from .presets import presets


def _address(value: object) -> IPv4Address | IPv6Address:
    if isinstance(value, IPv4Address | IPv6Address):
        return value
    try:
        return ipaddress.ip_address(str(value).strip("[]"))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _network(value: object) -> IPv4Network | IPv6Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    try:
        return ipaddress.ip_network(str(value))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a CIDR block ({exc})") from None


# The standard library's types, one clear error each (pydantic's IPvAny* types would also
# pull in pydantic.networks, ~2 MiB resident).
IPAddressValue = Annotated[IPv4Address | IPv6Address, PlainValidator(_address)]
IPNetworkValue = Annotated[IPv4Network | IPv6Network, PlainValidator(_network)]
Port = Annotated[int, Field(ge=1, le=65535)]
Mode = Literal["enforce", "audit"]
Scope = Literal["once", "session", "always"]
SCOPES: tuple[str, ...] = get_args(Scope)  # the approval scopes, in order of reach
DefaultAction = Literal["allow", "deny", "ask"]


def _known_preset(name: str) -> str:
    if name not in presets():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(presets())} "
                         "(agent-egress policy presets)")
    return name


PresetName = Annotated[str, AfterValidator(_known_preset)]

# Agent names land in events, reports and approvers' terminals: a small alphabet only.
AGENT_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
AGENT_NAME_RULE = "letters, digits and . _ @ + - only, at most 64 characters"


def _agent_name(name: str) -> str:
    if not AGENT_NAME.fullmatch(name):
        raise ValueError(f"agent name {name!r} is not valid: use {AGENT_NAME_RULE}")
    return name


AgentName = Annotated[str, AfterValidator(_agent_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# RFC 9110 and the WebDAV methods; a typo ("GTE") in a rule would otherwise match nothing.
HTTP_METHODS = frozenset({
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "PROPFIND",
    "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH", "QUERY"})


def _method(name: str) -> str:
    if name not in HTTP_METHODS:
        hint = f"; methods are upper case: {name.upper()!r}" if (
            name.upper() in HTTP_METHODS) else ""
        raise ValueError(f"unknown HTTP method {name!r}{hint} (known: "
                         f"{', '.join(sorted(HTTP_METHODS))})")
    return name


Method = Annotated[str, AfterValidator(_method)]


def _path_glob(text: str) -> str:
    try:
        parse_path_glob(text)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return text


PathGlobText = Annotated[str, AfterValidator(_path_glob)]


class RequestRuleSettings(_Strict):
    """One [[network.requests]] table: methods and paths on hosts that are already allowed."""

    host: str
    methods: list[Method] | None = Field(default=None, min_length=1)  # None: any method
    paths: list[PathGlobText] | None = Field(default=None, min_length=1)  # None: any path
    action: DefaultAction


class NetworkSettings(_Strict):
    default: DefaultAction = "ask"
    allow: list[str] = []
    deny: list[str] = []
    ports: list[Port] = Field(default=[80, 443], min_length=1)
    allow_ip_literals: bool = False
    block_private: bool = True
    allowed_cidrs: list[IPNetworkValue] = []
    raw_tcp: list[str] = []  # patterns whose tunnels may carry raw TCP (the host must be allowed)
    no_upstream: list[str] = []  # patterns reached directly, not through serve --upstream-proxy
    allow_ech: bool = False  # TLS with an encrypted ClientHello (its real name is hidden)
    header_timeout: float = Field(default=30.0, gt=0, le=3600)
    max_connections_per_client: int = Field(default=256, ge=1, le=65536)
    requests: list[RequestRuleSettings] = []
    read_only: list[str] = []  # patterns: only GET, HEAD and OPTIONS are sent to these hosts
    request_default: DefaultAction = "deny"  # on a host with request rules, none matching
    passthrough: list[str] = []  # patterns never intercepted (certificate-pinned clients)
    explain_https: bool = False  # answer refused HTTPS over TLS (clients trust the CA)
    upstream_ca_file: str | None = None  # PEM trust for intercepted origins (default: system)


ReviewRisk = Literal["low", "medium"]  # what auto-review may approve on its own
ReviewScope = Literal["once", "session"]  # never "always": a reviewer does not write policy


def _model_url(url: str) -> str:
    if url and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ValueError(f"model_url {url!r}: use the chat-completions base URL, e.g. "
                         "http://127.0.0.1:8080/v1 (requests go to URL/chat/completions)")
    return url.rstrip("/")


def _secret_source(text: str) -> str:
    """Where the key is kept; never the key itself (nor echoed back in an error)."""
    if not text:
        return text
    try:
        _credential_source(text)
    except ValueError:
        raise ValueError("api_key names where the key is kept, never the key itself: "
                         "env:VARIABLE, keyring:SERVICE/USER or file:/PATH") from None
    return text


class AutoReviewSettings(_Strict):
    """[approvals.auto_review]: a reviewer that may answer a held request before a person."""

    enabled: bool = False
    max_risk: ReviewRisk = "low"
    scope: ReviewScope = "session"
    model_url: Annotated[str, AfterValidator(_model_url)] = ""
    model: str = Field(default="", max_length=200)
    api_key: Annotated[str, AfterValidator(_secret_source)] = ""
    timeout: float = Field(default=20.0, gt=0, le=600)
    max_denials: int = Field(default=3, ge=1, le=1000)

    @model_validator(mode="after")
    def _model_named(self) -> AutoReviewSettings:
        if self.model_url and not self.model:
            raise ValueError("model_url is set but model is empty: name the model the server "
                             "should use (e.g. model = \"qwen2.5-7b-instruct\")")
        return self


class ApprovalSettings(_Strict):
    timeout: float = Field(default=120.0, gt=0, le=86400)
    max_pending: int = Field(default=100, ge=1, le=100000)
    max_pending_per_agent: int = Field(default=20, ge=1, le=100000)
    auto_review: AutoReviewSettings = AutoReviewSettings()


def _pattern_text(text: str) -> str:
    parse_pattern(text, allow_any=False)  # InvalidPattern is a ValueError: said with file:line
    return text


PatternText = Annotated[str, AfterValidator(_pattern_text)]


class Requirements(_Strict):
    """What a managed policy lets the user layer set (names after Codex's requirements.toml)."""

    allowed_modes: list[Mode] | None = None
    allowlist_expansion: bool = True
    managed_allowed_domains_only: bool = False
    allowed_approval_scopes: list[Scope] | None = None
    default_floor: DefaultAction | None = None
    allowed_ports: list[Port] | None = None
    telemetry_required: bool = False
    protected_file: bool = False  # refuse a user policy file another uid (or the agent) can change
    credential_hosts: list[PatternText] | None = None  # user credentials only for these hosts
    auto_review: Literal["forbidden", "allowed", "required"] | None = None
    auto_review_max_risk: ReviewRisk | None = None


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")  # an RFC 9110 token
CREDENTIAL_SOURCES = ("keyring:", "env:", "file:")


def _credential_name(name: str) -> str:
    if not AGENT_NAME.fullmatch(name):  # names land in events and terminals: the same alphabet
        raise ValueError(f"credential name {name!r} is not valid: use {AGENT_NAME_RULE}")
    return name


def _env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not an environment variable name (letters, digits, _)")
    return name


def _header_name(name: str) -> str:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not an HTTP header name")
    return name


def _credential_source(text: str) -> str:
    kind, _, value = text.partition(":")
    if f"{kind}:" not in CREDENTIAL_SOURCES or not value:
        raise ValueError(f"source {text!r}: use keyring:SERVICE/USER, env:VARIABLE or "
                         "file:/PATH (e.g. keyring:agent-egress/github)")
    if kind == "keyring" and (value.count("/") != 1 or "" in value.split("/")):
        raise ValueError(f"source {text!r}: a keyring source names SERVICE/USER, e.g. "
                         "keyring:agent-egress/github")
    if kind == "env":
        _env_name(value)
    if kind == "file" and not value.startswith("/"):
        raise ValueError(f"source {text!r}: a file source needs an absolute path")
    return text


class CredentialSettings(_Strict):
    """One [[credentials]] table: a secret the agent only ever holds a placeholder of."""

    name: Annotated[str, AfterValidator(_credential_name)]
    env: Annotated[str, AfterValidator(_env_name)]
    source: Annotated[str, AfterValidator(_credential_source)]
    hosts: list[str] = Field(min_length=1)
    header: Annotated[str, AfterValidator(_header_name)] = "Authorization"


class TelemetrySettings(_Strict):
    """OTLP export; unset keys fall back to the standard OTEL_* environment variables."""

    enabled: bool | None = None  # default: on when an OTLP endpoint is configured
    endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] | None = None
    headers: dict[str, str] = {}
    resource_attributes: dict[str, str] = {}


class PolicyFile(_Strict):
    version: Literal[1]
    # The version of a managed policy published at a URL: strictly increasing (docs/fleet.md).
    serial: Annotated[int, Field(strict=True, ge=1)] | None = None
    mode: Mode = "enforce"
    presets: list[PresetName] = []
    network: NetworkSettings = NetworkSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    resolve: dict[str, IPAddressValue] = {}
    identity: dict[IPNetworkValue, AgentName] = {}  # client address or network -> agent name
    telemetry: TelemetrySettings = TelemetrySettings()
    credentials: list[CredentialSettings] = []
    requirements: Requirements | None = None
