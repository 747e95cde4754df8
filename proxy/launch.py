"""`agent-egress env` and `health`: point an agent process at the running proxy, and ask it how
it is (the variables are shared with `run`)."""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from agent_egress.policy import CompiledPolicy, load_policy

from .approval_cli import add_socket_option
from .approval_client import ApprovalClient, ApprovalClientError, find_socket
from .approver import state_lines
from .ca import CAError, LocalCA, data_dir
from .ca_cli import add_ca_dir_option, local_ca
from .connect_cli import ssh_environment
from .paths import managed_policy_file, user_policy_file
from .textsafe import printable
from .trust import ca_environment, write_trust

DEFAULT_URL = "http://127.0.0.1:8080"


def proxy_environment(url: str, socks_url: str | None = None) -> dict[str, str]:
    """The variables an agent process needs (no NO_PROXY exceptions: everything goes through).
    ALL_PROXY is the SOCKS5 port where there is one (curl, git and others use it for what is
    not HTTP), else the HTTP proxy."""
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = socks_url if socks_url and name == "ALL_PROXY" else url
    env["NO_PROXY"] = env["no_proxy"] = ""
    return env


def chosen_policy(config: str | None, managed: str | None) -> CompiledPolicy:
    """The policy files a proxy would use (as serve picks them), loaded; raises PolicyError."""
    return load_policy(user_policy_file(config), managed=managed_policy_file(managed))


def secret_variables(policy: CompiledPolicy) -> list[str]:
    """The variables credentials read their secrets from (env: sources): the proxy's only."""
    credentials = policy.credentials.all if policy.credentials else ()
    return [c.source.removeprefix("env:") for c in credentials if c.source.startswith("env:")]


def trust_environment(ca: LocalCA, directory: Path,
                      environ: Mapping[str, str]) -> dict[str, str]:
    """The CA variables, pointing at a bundle of the user's trust plus the CA, written in
    ``directory``; raises CAError."""
    bundle, certificate = write_trust(ca, directory, environ)
    return ca_environment(bundle, certificate)


def with_agent(url: str, agent_id: str | None) -> str:
    if not agent_id:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{quote(agent_id, safe='')}@{rest}"


def format_environment(env: dict[str, str], shell: str) -> str:
    lines = []
    for name, value in env.items():
        if shell == "bash":
            lines.append(f"export {name}={shlex.quote(value)}")
        elif shell == "fish":
            lines.append(f"set -gx {name} {shlex.quote(value)}")
        elif shell == "powershell":
            escaped = value.replace("'", "''")
            lines.append(f"$env:{name} = '{escaped}'")
        else:  # dotenv
            lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


def running_proxy(socket_path: Path) -> tuple[str | None, str | None, dict[str, str]]:
    """The running proxy's URL, its SOCKS5 URL (if it has that port) and the credentials'
    placeholders it gives agents."""
    try:
        with ApprovalClient(socket_path, timeout=3) as client:
            status = client.request("status")["status"]
    except (ApprovalClientError, OSError, ValueError, KeyError):
        return None, None, {}
    listen, socks = status.get("listen") or [], status.get("socks") or []
    placeholders = status.get("agent_environment") or {}
    return (f"http://{listen[0]}" if listen else None,
            f"socks5h://{socks[0]}" if socks else None,
            {str(name): str(value) for name, value in placeholders.items()})


def cmd_env(args: argparse.Namespace) -> int:
    try:
        running, socks, placeholders = running_proxy(find_socket(args.approval_socket))
    except ApprovalClientError:
        running, socks, placeholders = None, None, {}
    url = args.proxy or running or DEFAULT_URL
    socks = None if args.proxy else socks  # --proxy names the proxy: its port, not another's
    env = {**placeholders, **proxy_environment(with_agent(url, args.agent_id),
                                               with_agent(socks, args.agent_id) if socks else None)}
    if socks:
        env.update(ssh_environment(os.environ))  # git over SSH through `connect`
    try:
        if args.ca_file:
            env.update(ca_environment(Path(args.ca_file), Path(args.ca_file)))
        elif chosen_policy(args.config, args.managed).interception_configured:
            env.update(trust_environment(local_ca(args), data_dir() / "trust", os.environ))
    except CAError as exc:
        print(f"agent-egress env: {printable(exc)}", file=sys.stderr)
        return 1
    sys.stdout.write(format_environment(env, args.shell))
    if args.no_check or proxy_answers(url):
        return 0
    print(f"agent-egress env: no agent-egress proxy answers at {printable(url)}; start one "
          "('agent-egress serve') or pass --proxy URL (--no-check to skip this check)",
          file=sys.stderr)
    return 1


def proxy_answers(url: str) -> bool:
    """Whether an agent-egress proxy answers its health check at this URL."""
    parsed = urlsplit(url)
    if not parsed.hostname:
        return False
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=2)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def cmd_health(args: argparse.Namespace) -> int:
    try:
        with ApprovalClient(find_socket(args.approval_socket), timeout=5) as client:
            status = client.request("status")["status"]
            pending = len(client.request("list")["pending"])
    except (ApprovalClientError, OSError) as exc:
        print(f"unhealthy: {printable(exc)}", file=sys.stderr)
        return 1
    failure = status.get("last_reload_failure")
    listen = printable(", ".join(status.get("listen") or []))
    if socks := status.get("socks"):
        listen += f" (SOCKS5 on {printable(', '.join(socks))})"
    managed = status.get("managed_url")
    unavailable = bool(managed) and not managed.get("available")
    print(f"{'unhealthy' if unavailable else 'ok'}: listening on {listen}; policy "
          f"{printable(status['policy'])}; mode {printable(status['mode'])}; {pending} pending "
          "approvals" + ("; LAST RELOAD FAILED (previous policy in force)" if failure else ""))
    if managed:
        print(managed_url_line(managed))
    if separation := status.get("approval_separation"):
        print(f"approvals: {printable(separation)}")
    for warning in status.get("file_warnings") or ():
        print(f"WARNING: {printable(warning)}")
    for line in state_lines(status):
        print(line)
    return 1 if unavailable else 0


def managed_url_line(managed: dict[str, Any]) -> str:
    """The managed policy from a URL, for `health` and `policy show`: in force, or not."""
    failure = managed.get("last_failure")
    last = (f"; last failure at {printable(failure['at'])}: {printable(failure['reason'])}: "
            f"{printable(failure['error'])}" if failure else "")
    if not managed.get("available"):
        return (f"managed policy {printable(managed['url'])}: UNAVAILABLE, no verified version: "
                f"every request is refused{last}")
    return (f"managed policy {printable(managed['url'])}: serial {managed['serial']} in force "
            f"(key {printable(managed['key'])}, fetched {printable(managed['fetched_at'])})"
            f"{last}")


def add_parsers(commands: Any) -> None:
    env = commands.add_parser(
        "env", help="print the environment an agent process needs",
        description="Print HTTP_PROXY, HTTPS_PROXY, ALL_PROXY (and lower-case twins) and an "
                    "empty NO_PROXY for the running proxy (or --proxy URL, default "
                    f"{DEFAULT_URL}). When the policy (--config/--managed, picked as serve "
                    "picks them) intercepts TLS, also the CA variables common tools read, "
                    "pointing at a bundle of the trust you had plus the local CA "
                    "(docs/interception.md), and the placeholders of the running proxy's "
                    "credentials (docs/credentials.md).")
    env.add_argument("--shell", choices=("bash", "fish", "powershell", "dotenv"),
                     default="bash")
    env.add_argument("--proxy", metavar="URL", help="proxy URL (default: the running proxy)")
    env.add_argument("--agent-id", metavar="ID", help="name the agent in the proxy URL")
    env.add_argument("--config", metavar="FILE", help="user policy (default: as serve)")
    env.add_argument("--managed", metavar="FILE", help="managed policy (default: as serve)")
    env.add_argument("--ca-file", metavar="FILE",
                     help="set the CA variables to this bundle instead of writing one")
    add_ca_dir_option(env)
    add_socket_option(env)
    env.set_defaults(handler=cmd_env)
    env.add_argument("--no-check", action="store_true",
                     help="print the variables even when no proxy answers at the address "
                          "(default: say so on stderr and exit 1)")
    health = commands.add_parser(
        "health", help="check that the proxy is up (exit 0) or not",
        description="Ask the running proxy over its approval socket: exit 0 with its listen "
                    "address, policy, mode, pending approvals, whether approvals are separated "
                    "from the agent and any warning about its policy files; exit 1 when no "
                    "proxy answers, or when its managed policy must come from a URL and it has "
                    "no verified version (it refuses every request). For container probes, "
                    "GET /healthz on the proxy port (liveness only).")
    add_socket_option(health)
    health.set_defaults(handler=cmd_health)
