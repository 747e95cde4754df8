"""The proxy's own DNS: every address a name resolves to, checked against the policy.

Used by the enforcer for each new upstream (which then pins the address) and by `policy
explain`, so explain reports exactly what the proxy would. No mitmproxy here: the CLI uses it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from agent_egress.policy import CompiledPolicy, Decision, normalize_host
from agent_egress.policy.hosts import IPAddress


@dataclass(frozen=True, slots=True)
class Resolution:
    addresses: tuple[IPAddress, ...] = ()
    refusal: str | None = None  # why the upstream must not be used
    dns_failed: bool = False
    denial: Decision | None = None  # a deny rule covers one of the addresses


async def resolve_upstream(policy: CompiledPolicy, host: str, port: int,
                           timeout: float) -> Resolution:
    """Addresses for a host (static overrides first, then DNS with a timeout), and why the
    proxy must refuse them if it must: a deny rule for their network, or a non-public one."""
    target = normalize_host(host)
    if target.ip is not None:
        addresses: tuple[IPAddress, ...] = (target.ip,)
    elif (override := policy.resolve_override(target.name)) is not None:
        addresses = (override,)
    else:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(target.name, port,
                                                       type=socket.SOCK_STREAM),
                timeout=timeout)
        except (TimeoutError, OSError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            return Resolution(refusal=f"DNS lookup of {target.name} failed: {why}",
                              dns_failed=True)
        unique = dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0])
                               for info in infos)
        addresses = tuple(unique)
    if target.ip is None and (
            denial := policy.address_denial(target.name, port, addresses)) is not None:
        return Resolution(addresses, denial.detail, denial=denial)
    refusal = policy.address_refusal(addresses)
    if refusal:
        return Resolution(addresses, f"{target.name} resolves to {refusal}")
    return Resolution(addresses)
