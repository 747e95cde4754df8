"""`agent-egress env` and `agent-egress run`: point an agent process at the proxy."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote

from .approval_client import ApprovalClient, ApprovalClientError
from .paths import default_socket_path
from .textsafe import printable

CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT",
                "GIT_SSL_CAINFO", "CURL_CA_BUNDLE")
DEFAULT_URL = "http://127.0.0.1:8080"
_LISTENING = re.compile(r"listening on (\S+)")


def proxy_environment(url: str, ca_file: str | None = None) -> dict[str, str]:
    """The variables an agent process needs (no NO_PROXY exceptions: everything goes through)."""
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = url
    env["NO_PROXY"] = env["no_proxy"] = ""
    if ca_file:
        env.update({name: ca_file for name in CA_VARIABLES})
    return env


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


def running_proxy_url(socket_path: Path) -> str | None:
    try:
        with ApprovalClient(socket_path, timeout=3) as client:
            status = client.request("status")["status"]
    except (ApprovalClientError, OSError, ValueError, KeyError):
        return None
    listen = status.get("listen") or []
    return f"http://{listen[0]}" if listen else None


def cmd_env(args: argparse.Namespace) -> int:
    socket_path = args.approval_socket or default_socket_path()
    url = args.proxy or running_proxy_url(socket_path) or DEFAULT_URL
    env = proxy_environment(with_agent(url, args.agent_id), args.ca_file)
    sys.stdout.write(format_environment(env, args.shell))
    return 0


def _start_proxy(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "agent_egress.proxy", "serve", "--listen", args.listen]
    for option, value in (("--config", args.config), ("--managed", args.managed),
                          ("--audit-log", args.audit_log),
                          ("--approval-socket", args.approval_socket)):
        if value:
            command += [option, str(value)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
                               stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    address = None
    for line in process.stdout:
        sys.stderr.write(f"[agent-egress] {line}")
        if match := _LISTENING.search(line):
            address = match.group(1)
        if line.strip().startswith("http_proxy="):
            break
    if address is None:
        process.wait()
        raise SystemExit(f"agent-egress run: the proxy did not start (exit {process.returncode})")
    stdout = process.stdout
    threading.Thread(target=lambda: [sys.stderr.write(f"[agent-egress] {line}")
                                     for line in stdout], daemon=True).start()
    return process, f"http://{address}"


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("agent-egress run: give the command to run after --, e.g. "
              "agent-egress run -- curl https://pypi.org/simple/", file=sys.stderr)
        return 2
    socket_path = args.approval_socket or default_socket_path()
    started = None
    url = running_proxy_url(socket_path)
    if url is None:
        started, url = _start_proxy(args)
    else:
        print(f"agent-egress run: using the proxy already running at {printable(url)}",
              file=sys.stderr)
    env = {**os.environ, **proxy_environment(with_agent(url, args.agent_id))}
    try:
        try:
            child = subprocess.Popen(command, env=env)
        except FileNotFoundError:
            print(f"agent-egress run: command not found: {command[0]}", file=sys.stderr)
            return 127
        while True:
            try:
                status = child.wait()
                break
            except KeyboardInterrupt:
                child.send_signal(signal.SIGINT)  # let the agent decide how to stop
        return status if status >= 0 else 128 - status
    finally:
        if started is not None:
            started.send_signal(signal.SIGTERM)
            try:
                started.wait(15)
            except subprocess.TimeoutExpired:
                started.kill()


def cmd_health(args: argparse.Namespace) -> int:
    socket_path = args.approval_socket or default_socket_path()
    try:
        with ApprovalClient(socket_path, timeout=5) as client:
            status = client.request("status")["status"]
            pending = len(client.request("list")["pending"])
    except (ApprovalClientError, OSError) as exc:
        print(f"unhealthy: {printable(exc)}", file=sys.stderr)
        return 1
    failure = status.get("last_reload_failure")
    listen = printable(", ".join(status.get("listen") or []))
    print(f"ok: listening on {listen}; policy {printable(status['policy'])}"
          f"; mode {printable(status['mode'])}; {pending} pending approvals"
          + ("; LAST RELOAD FAILED (previous policy in force)" if failure else ""))
    if separation := status.get("approval_separation"):
        print(f"approvals: {printable(separation)}")
    for warning in status.get("file_warnings") or ():
        print(f"WARNING: {printable(warning)}")
    return 0


def add_parsers(commands: argparse._SubParsersAction, socket_option) -> None:  # type: ignore[type-arg]
    env = commands.add_parser(
        "env", help="print the environment an agent process needs",
        description="Print HTTP_PROXY, HTTPS_PROXY, ALL_PROXY (and lower-case twins) and an "
                    "empty NO_PROXY for the running proxy (or --proxy URL, default "
                    f"{DEFAULT_URL}).")
    env.add_argument("--shell", choices=("bash", "fish", "powershell", "dotenv"),
                     default="bash")
    env.add_argument("--proxy", metavar="URL", help="proxy URL (default: the running proxy)")
    env.add_argument("--agent-id", metavar="ID", help="name the agent in the proxy URL")
    env.add_argument("--ca-file", metavar="FILE",
                     help="also set the CA bundle variables common tools read (for policies "
                          "that intercept TLS)")
    socket_option(env)
    run = commands.add_parser(
        "run", help="run a command with its traffic going through the proxy",
        description="Run COMMAND with the proxy variables set, through the running proxy or "
                    "one started for it (and stopped after). Exits with COMMAND's status.")
    run.add_argument("--agent-id", metavar="ID", help="the agent's name on every event")
    run.add_argument("--config", metavar="FILE", help="policy for a proxy started by run")
    run.add_argument("--managed", metavar="FILE", help="managed policy for a started proxy")
    run.add_argument("--audit-log", metavar="FILE", help="audit log for a started proxy")
    run.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:0",
                     help="listen address for a started proxy (default: a free port)")
    socket_option(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    health = commands.add_parser("health", help="check that the proxy is up (exit 0) or not")
    socket_option(health)
