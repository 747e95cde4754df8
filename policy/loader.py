"""Reading policy files: TOML in, a CompiledPolicy or a PolicyError out, never half of one."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from .engine import CompiledPolicy
from .errors import InvalidHost, InvalidPattern, PolicyError, Problem
from .hosts import normalize_host
from .layering import compile_layers
from .model import (
    ApprovalSettings,
    CredentialSettings,
    NetworkSettings,
    PolicyFile,
    RequestRuleSettings,
    Requirements,
)
from .patterns import parse_pattern
from .source import ParsedFile, locate

BUILTIN = "<built-in default policy>"
_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


def default_user_policy_path() -> Path:
    """Where the user's own policy lives when --config is not given (XDG config dir)."""
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "agent-egress" / "policy.toml"


def builtin_policy_text() -> str:
    return resources.files(__package__).joinpath("default.toml").read_text(encoding="utf-8")


class ManagedUnavailable(NamedTuple):
    """A managed policy that must come from ``source`` (a URL) and has not been verified: the
    policy then refuses everything, saying ``detail``."""

    source: str
    detail: str


def load_policy(path: str | Path | None, *, resolve: Sequence[str] = (),
                managed: str | Path | ParsedFile | ManagedUnavailable | None = None,
                shared: Sequence[tuple[str, str]] = ()) -> CompiledPolicy:
    """Load and compile the user policy (the built-in default when path is None), under the
    managed policy when one is given: a file's path, or text already read and verified (a
    ParsedFile, from a URL). ``resolve`` adds ``HOST=ADDR`` overrides, like
    ``serve --resolve``; ``shared``, (action, pattern) rules a fleet decided `always`, which
    join the user layer (bounded by the managed policy like its own rules). Raises PolicyError
    for a file that is invalid as a whole; requirement violations are in ``problems``.
    """
    user = read_policy_file(path) if path is not None else parse_policy_text(
        builtin_policy_text(), BUILTIN)
    if shared:
        user = with_rules(user, shared)
    if isinstance(managed, ManagedUnavailable):
        return compile_layers(user, None, cli_resolve(resolve)).refusing_everything(
            managed.detail)
    managed_file = (managed if isinstance(managed, ParsedFile) or managed is None
                    else read_policy_file(managed))
    return compile_layers(user, managed_file, cli_resolve(resolve))


def with_rules(parsed: ParsedFile, rules: Sequence[tuple[str, str]]) -> ParsedFile:
    """The file with these (action, pattern) rules added to its allow and deny lists."""
    network = parsed.model.network
    added = {action: [p for a, p in rules if a == action and p not in getattr(network, action)]
             for action in ("allow", "deny")}
    network = network.model_copy(update={action: getattr(network, action) + patterns
                                          for action, patterns in added.items()})
    return parsed._replace(model=parsed.model.model_copy(update={"network": network}))


def read_policy_file(path: str | Path) -> ParsedFile:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(source, [Problem("file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(source, [Problem(f"cannot be read: {exc}")]) from None
    return parse_policy_text(text, source)


def parse_policy(text: str, source: str, *, resolve: Sequence[str] = ()) -> CompiledPolicy:
    """A single-layer policy from TOML text."""
    return compile_layers(parse_policy_text(text, source), None, cli_resolve(resolve))


def parse_policy_text(text: str, source: str) -> ParsedFile:
    """TOML text to a validated model, or a PolicyError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        line = int(position.group(1)) if position else None
        clean = _TOML_POSITION.sub("", message).strip() if position else message
        raise PolicyError(source, [Problem(f"not valid TOML: {clean}", line=line)]) from None
    try:
        model = PolicyFile.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(error, text) for error in exc.errors()]
        # Every problem at once: the rule patterns too, which only compiling would reach.
        problems += _pattern_problems(data, text)
        raise PolicyError(source, sorted(problems, key=lambda p: p.line or 0)) from None
    problems = []
    for host in model.resolve:
        try:
            normalize_host(host)
        except InvalidHost as exc:
            problems.append(Problem(f"{exc}", key=f"resolve.{host}",
                                    line=locate(text, ("resolve", host))))
    if problems:
        raise PolicyError(source, problems)
    return ParsedFile(model, source, text)


def _pattern_problems(data: dict[str, Any], text: str) -> list[Problem]:
    """Pattern errors in a file whose schema is broken elsewhere (the same checks as the
    compiler's, on whatever lists of strings are there)."""
    network = data.get("network")
    if not isinstance(network, dict):
        return []
    problems = []
    for key in ("allow", "deny", "raw_tcp"):
        patterns = network.get(key)
        if not isinstance(patterns, list):
            continue
        for index, pattern in enumerate(patterns):
            if not isinstance(pattern, str):
                continue
            try:
                parse_pattern(pattern, allow_any=key == "allow")
            except InvalidPattern as exc:
                problems.append(Problem(str(exc), key=f"network.{key}[{index}]",
                                        line=locate(text, ("network", key, index), pattern)))
    return problems


def cli_resolve(items: Sequence[str]) -> dict[str, Any]:
    """``HOST=ADDR`` strings (serve --resolve) as normalised host -> address."""
    overrides: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in items:
        host, sep, address = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected HOST=ADDR")
            overrides[normalize_host(host).name] = ipaddress.ip_address(address.strip("[]"))
        except (InvalidHost, ValueError) as exc:
            problems.append(Problem(f"--resolve {item!r}: {exc}; expected HOST=ADDR, "
                                    "e.g. pypi.example.test=127.0.0.1"))
    if problems:
        raise PolicyError("command line", problems)
    return overrides


def _problem(error: dict[str, Any], text: str) -> Problem:
    loc = tuple(error["loc"])
    key = ".".join(str(part) if not isinstance(part, int) else f"[{part}]" for part in loc)
    key = key.replace(".[", "[")
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        valid = list(_model_at(loc[:-1]).model_fields)
        guess = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        message = f"unknown key {loc[-1]!r}{hint} (valid keys here: {', '.join(valid)})"
    elif kind == "missing":
        message = "required key is missing" + (
            "; start the file with: version = 1" if loc == ("version",) else "")
    elif kind in ("value_error", "assertion_error"):
        message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
    else:
        message = f"{error['msg']} (got {value!r})"
        if loc == ("version",):
            message += "; this release reads version = 1"
    line = locate(text, loc, value if isinstance(value, str) else None)
    return Problem(message, key=key, line=line)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    tables = {(): PolicyFile, ("network",): NetworkSettings, ("approvals",): ApprovalSettings,
              ("requirements",): Requirements, ("credentials", 0): CredentialSettings,
              ("network", "requests", 0): RequestRuleSettings}
    generic = tuple(0 if isinstance(part, int) else part for part in loc)  # any list index
    return tables.get(generic, PolicyFile)
