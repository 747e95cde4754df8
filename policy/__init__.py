"""The agent-egress decision engine: pure, fast, and free of proxy or socket code."""

from .addresses import embedded_ipv4, non_public_reason
from .engine import Action, CompiledPolicy, Decision, Layer, Reason, Rule, RuleIndex, Settings
from .errors import InvalidHost, InvalidPattern, PolicyError, Problem
from .hosts import Host, normalize_host, parse_ipv4, split_host_port
from .loader import (
    BUILTIN,
    builtin_policy_text,
    default_user_policy_path,
    load_policy,
    parse_policy,
)
from .model import SCOPES
from .patterns import Kind, Pattern, parse_pattern

__all__ = [
    "BUILTIN",
    "SCOPES",
    "Action",
    "CompiledPolicy",
    "Decision",
    "Host",
    "InvalidHost",
    "InvalidPattern",
    "Kind",
    "Layer",
    "Pattern",
    "PolicyError",
    "Problem",
    "Reason",
    "Rule",
    "RuleIndex",
    "Settings",
    "builtin_policy_text",
    "default_user_policy_path",
    "embedded_ipv4",
    "load_policy",
    "non_public_reason",
    "normalize_host",
    "parse_ipv4",
    "parse_pattern",
    "parse_policy",
    "split_host_port",
]
