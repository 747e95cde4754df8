"""The shared state of a fleet of proxies in Redis (`serve --state redis://...`): its keys and
the operations on them, used alike by the proxies (addons/fleet.py) and by an approver's
commands (proxy/fleet_client.py).

Redis does the coordinating: ``SET NX`` makes one pending approval per destination for the
whole fleet, key TTLs make it expire with its scope, and one pub/sub channel tells every proxy
and every watching approver what was opened, closed and decided. Nothing here is a protocol of
our own beyond the JSON in the values.

Keys (all under ``agent-egress:``):

- ``hold:<digest>``: the shared approval id held for a destination (and request), PX = timeout
- ``pending:<id>``: its description for approvers (JSON), same TTL; ``pending`` a sorted set of
  ids by deadline, for listing
- ``decision:<id>``: the decision on an id, for a proxy that joins or reconnects late
- ``session:<host>:<port>``: a session grant (JSON verdict), EX = the session TTL
- ``always``: a hash of `always` decisions, ``host:port`` (or ``host:*``) -> JSON
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from agent_egress.policy import (
    SCOPES,
    InvalidHost,
    InvalidPattern,
    normalize_host,
    parse_pattern,
    split_host_port,
)
from agent_egress.policy.writer import rule_pattern

from .pending import ApprovalError

PREFIX = "agent-egress:"
CHANNEL = PREFIX + "events"
PENDING_INDEX = PREFIX + "pending"
ALWAYS = PREFIX + "always"
DEFAULT_SESSION_TTL = 12 * 3600  # a working day: what "for the session" means for a fleet
# Delete a key only if it still holds our value: a hold that expired and was opened again by
# another proxy is not ours to remove.
_DELETE_IF = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
              "return redis.call('del', KEYS[1]) end return 0")


def hold_key(host: str, port: int, request: str = "") -> str:
    # surrogateescape: a request line may carry bytes that are not UTF-8 (the agent's).
    digest = hashlib.sha256(f"{host}\0{port}\0{request}".encode(
        errors="surrogateescape")).hexdigest()[:32]
    return f"{PREFIX}hold:{digest}"


def pending_key(approval_id: str) -> str:
    return f"{PREFIX}pending:{approval_id}"


def decision_key(approval_id: str) -> str:
    return f"{PREFIX}decision:{approval_id}"


def session_key(host: str, port: int | None, request: str = "") -> str:
    base = f"{PREFIX}session:{host}:{'*' if port is None else port}"
    digest = hashlib.sha256(request.encode(errors="surrogateescape")).hexdigest()[:32]
    return base + (f":{digest}" if request else "")


def always_field(host: str, port: int | None) -> str:
    return f"{host}:{'*' if port is None else port}"


def display_url(url: str) -> str:
    """The state URL without its password, for banners, events and health."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}{shown}{port}{parts.path}"


def password_from_environment(url: str) -> dict[str, str]:
    """The password from REDISCLI_AUTH (redis-cli's own variable) when the URL has none: an
    environment is readable by the same uid only, a command line by every local user."""
    if urlsplit(url).password is None and (password := os.environ.get("REDISCLI_AUTH")):
        return {"password": password}
    return {}


def local_account() -> str:
    """Who runs this command on which machine: half of an approver's identity (the other half
    is the Redis ACL user, which Redis itself authenticated)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "?"
    return f"{name}(uid:{os.getuid()})@{socket.gethostname()}"


async def acl_user(redis: Any) -> str:
    """The Redis ACL user this connection is authenticated as ("default" without ACLs)."""
    try:
        user = await redis.execute_command("ACL", "WHOAMI")
    except Exception:  # a server without ACLs (Redis < 6): its one password user
        return "default"
    return user.decode() if isinstance(user, bytes) else str(user)


def actor_of(redis_user: str, account: str) -> str:
    return f"redis:{redis_user}/{account}"


def loads(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def publish(redis: Any, message: Mapping[str, Any]) -> int:
    """To every proxy and watching approver; the number of subscribers that received it."""
    return int(await redis.publish(CHANNEL, json.dumps(message)))


async def claim(redis: Any, host: str, port: int, request: str, local_id: str,
                ttl: float) -> tuple[str, float]:
    """The fleet's approval id for this destination: ours when we are first (SET NX), else the
    one already held and the seconds it has left."""
    key = hold_key(host, port, request)
    ttl_ms = max(1, int(ttl * 1000))
    if await redis.set(key, local_id, nx=True, px=ttl_ms):
        return local_id, ttl
    async with redis.pipeline(transaction=False) as pipe:
        shared, left = await pipe.get(key).pttl(key).execute()
    if shared is None:  # expired between the two commands: try once more
        if await redis.set(key, local_id, nx=True, px=ttl_ms):
            return local_id, ttl
        shared, left = await redis.get(key), await redis.pttl(key)
    shared = shared.decode() if isinstance(shared, bytes) else str(shared)
    return shared, max(0.0, (left or 0) / 1000)


async def announce(redis: Any, summary: Mapping[str, Any], request: str, ttl: float,
                   again: bool = False) -> None:
    """Publish a newly opened pending approval: its record, the index, the event. ``again``:
    after a reconnection, only if the state has lost it (a restarted Redis)."""
    approval_id = summary["id"]
    if again and await redis.exists(pending_key(approval_id)):
        return
    record = {**summary, "request": request, "deadline": time.time() + ttl}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(pending_key(approval_id), json.dumps(record), px=max(1, int(ttl * 1000)))
        pipe.zadd(PENDING_INDEX, {approval_id: record["deadline"]})
        await pipe.execute()
    await publish(redis, {"event": "pending.opened", "pending": record})


async def release(redis: Any, approval_id: str, host: str, port: int, request: str,
                  outcome: str) -> None:
    """The pending approval is over (decided, timed out, abandoned): gone from the fleet."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.eval(_DELETE_IF, 1, hold_key(host, port, request), approval_id)
        pipe.delete(pending_key(approval_id))
        pipe.zrem(PENDING_INDEX, approval_id)
        await pipe.execute()
    await publish(redis, {"event": "pending.closed", "outcome": outcome,
                          "pending": {"id": approval_id, "host": host, "port": port}})


async def list_pending(redis: Any) -> list[dict[str, Any]]:
    """Every pending approval of the fleet, oldest first (expired ones pruned)."""
    now = time.time()
    await redis.zremrangebyscore(PENDING_INDEX, "-inf", now)
    ids = await redis.zrange(PENDING_INDEX, 0, -1)
    if not ids:
        return []
    records = await redis.mget([pending_key(i.decode() if isinstance(i, bytes) else i)
                                for i in ids])
    found = [record for raw in records if (record := loads(raw)) is not None]
    for record in found:
        record["expires_in"] = max(0.0, round(float(record.get("deadline", now)) - now, 1))
    return sorted(found, key=lambda r: str(r.get("first_seen", "")))


async def session_grant(redis: Any, host: str, port: int,
                        request: str = "") -> dict[str, Any] | None:
    """A fleet session decision for this destination: for its port, else for every port."""
    if request:
        return loads(await redis.get(session_key(host, port, request)))
    exact, any_port = await redis.mget([session_key(host, port), session_key(host, None)])
    return loads(exact) or loads(any_port)


async def decided(redis: Any, approval_id: str) -> dict[str, Any] | None:
    return loads(await redis.get(decision_key(approval_id)))


async def always_rules(redis: Any) -> list[dict[str, Any]]:
    """The fleet's `always` decisions, each {"action", "host", "port", "actor", "at"}."""
    rules = await redis.hgetall(ALWAYS)
    return [rule for raw in rules.values() if (rule := loads(raw)) is not None]


def checked_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """An `always` decision as read from Redis, validated (InvalidHost or InvalidPattern):
    exactly one host (no wildcard, no network) and an optional port."""
    if rule.get("decision") not in ("allow", "deny"):
        raise InvalidPattern("decision must be allow or deny")
    host = normalize_host(str(rule.get("host"))).name
    port = rule.get("port")
    if port is not None and not (type(port) is int and 0 < port < 65536):
        raise InvalidPattern(f"bad port {port!r}")
    parse_pattern(rule_pattern(host, port), allow_any=False)
    return {**rule, "host": host}


def _target(target: str) -> tuple[str, int | None]:
    try:
        host_text, port = split_host_port(target)
        return normalize_host(host_text).name, port
    except InvalidHost as exc:
        raise ApprovalError("bad_target", f"{target!r} is neither a pending id nor a "
                            f"HOST[:PORT]: {exc}") from None


async def decide(redis: Any, target: str, decision: str, scope: str, actor: str, *,
                 session_ttl: float = DEFAULT_SESSION_TTL) -> dict[str, Any]:
    """Record a person's decision for the fleet and tell every proxy, which releases its
    waiting requests. ``target``: a pending id, or HOST[:PORT] (every pending approval for it,
    and with session/always, requests that have not arrived yet)."""
    if decision not in ("allow", "deny"):
        raise ApprovalError("bad_request", "decision must be 'allow' or 'deny'")
    if scope not in SCOPES:
        raise ApprovalError("bad_request", f"scope must be one of {', '.join(SCOPES)}")
    pending = await list_pending(redis)
    if len(target) == 8 and all(c in "0123456789abcdef" for c in target):
        matches = [p for p in pending if p.get("id") == target]
        if not matches:
            raise ApprovalError("unknown_id", f"no pending request with id {target} (it may "
                                "have been decided or expired); 'agent-egress pending --state "
                                "URL' lists the waiting ones")
        host, port = matches[0]["host"], matches[0]["port"]
    else:
        host, port = _target(target)
        matches = [p for p in pending
                   if p.get("host") == host and (port is None or p.get("port") == port)]
    if not matches and scope == "once":
        raise ApprovalError("not_found", f"nothing is waiting for {target}; use --scope "
                            "session or always to decide ahead of a request")
    if scope == "always" and any(p.get("request") for p in matches):
        raise ApprovalError("unsupported", "a request held by an ask request rule is decided "
                            "once or for the session")
    now = time.time()
    verdict = {"decision": decision, "scope": scope, "actor": actor, "host": host,
               "port": port, "at": now,
               "expires_at": now + session_ttl if scope == "session" else None}
    async with redis.pipeline(transaction=True) as pipe:
        for item in matches:
            # Decided: gone from the fleet at once, so a later request opens a new pending
            # approval (a `once` decision is never found by it, even if the proxy that opened
            # this one is gone and cannot release it).
            pipe.eval(_DELETE_IF, 1, hold_key(host, item["port"], item.get("request") or ""),
                      item["id"])
            pipe.delete(pending_key(item["id"]))
            pipe.zrem(PENDING_INDEX, item["id"])
            ttl_ms = max(1000, int((item.get("expires_in") or 0) * 1000) + 60_000)
            pipe.set(decision_key(item["id"]), json.dumps({**verdict, "id": item["id"]}),
                     px=ttl_ms)
            if scope == "session":
                pipe.set(session_key(host, item["port"], item.get("request") or ""),
                         json.dumps(verdict), ex=int(session_ttl))
        if scope == "session" and not matches:
            pipe.set(session_key(host, port), json.dumps(verdict), ex=int(session_ttl))
        if scope == "always":
            for rule_port in {item["port"] for item in matches} or {port}:
                pipe.hset(ALWAYS, always_field(host, rule_port),
                          json.dumps({**verdict, "port": rule_port}))
        await pipe.execute()
    ids = [item["id"] for item in matches]
    delivered = await publish(redis, {"event": "decided", "ids": ids, **verdict,
                                      "requests": [item.get("request") or "" for item in matches]})
    return {"host": host, "port": port, "decision": decision, "scope": scope, "ids": ids,
            "released": len(ids), "delivered": delivered, "fleet": True}
