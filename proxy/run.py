"""`agent-egress run -- COMMAND`: the command with its traffic through a proxy of its own (or
the running one, with --join), optionally as another user so it cannot approve itself."""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_egress.policy import PolicyError

from .approval_cli import add_socket_option
from .approval_client import ApprovalClient, ApprovalClientError, find_socket
from .ca import CAError
from .ca_cli import add_ca_dir_option, local_ca
from .connect_cli import ssh_environment
from .isolate import PYTHON, Isolation, IsolationError, inside_url, namespace_command
from .launch import (
    chosen_policy,
    proxy_environment,
    secret_variables,
    trust_environment,
    with_agent,
)
from .paths import managed_policy_file, run_socket_path, user_policy_file
from .textsafe import printable, printable_lines


def add_parsers(commands: Any) -> None:
    run = commands.add_parser(
        "run", help="run a command with its traffic going through the proxy",
        description="Run COMMAND with the proxy variables set, through a proxy started for it "
                    "on a free port with this run's policy and its own approval socket "
                    "(watch and pending find it), stopped when COMMAND exits. With --join, "
                    "through the proxy already running instead, if it enforces the same policy "
                    "files. ALL_PROXY points at the proxy's SOCKS5 port, and GIT_SSH_COMMAND "
                    "(unless set) makes ssh reach hosts through it ('agent-egress connect'). "
                    "Exits with COMMAND's status.")
    run.add_argument("--agent-id", metavar="ID", help="the agent's name on every event")
    run.add_argument("--agent-user", metavar="USER",
                     help="run COMMAND as this user (needs root): the approval socket refuses "
                          "it, so the agent cannot approve its own requests")
    run.add_argument("--isolate", nargs="?", const="auto", choices=("auto", "bwrap", "unshare"),
                     help="run COMMAND in a network namespace with only loopback, where the "
                          "proxy is the one way out: no direct connection, no DNS. It needs "
                          "bubblewrap, or root for unshare (auto: bwrap if installed); refused "
                          "otherwise")
    run.add_argument("--join", action="store_true",
                     help="use the running proxy (refused when its policy files differ from "
                          "this run's); it is left running")
    run.add_argument("--config", metavar="FILE",
                     help="user policy (default: as serve picks it)")
    run.add_argument("--managed", metavar="FILE", help="managed policy (default: as serve)")
    run.add_argument("--audit-log", metavar="FILE", help="audit log for the started proxy")
    run.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:0",
                     help="listen address for the started proxy (default: a free port)")
    run.add_argument("--no-explain-https", action="store_true",
                     help="do not answer refused HTTPS over TLS with the reason (by default "
                          "run does: it gives the command the CA variables)")
    add_ca_dir_option(run)
    add_socket_option(run)
    run.set_defaults(handler=cmd_run)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")


_LISTENING = re.compile(r"listening on (\S+)")
_SOCKS = re.compile(r"SOCKS5 listening on (\S+)")
_PLACEHOLDER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)")


class RunError(Exception):
    """`run` cannot start the command as asked; the message says why and what to do."""


@dataclass(frozen=True)
class AgentUser:
    """Who the command runs as with --agent-user: another uid than the proxy's, so the approval
    socket refuses it and it cannot approve its own requests."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def named(cls, name: str) -> AgentUser:
        if os.geteuid() != 0:
            raise RunError("--agent-user needs root (run starts the command as that user); "
                           "without root, run the agent under another account yourself")
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except (KeyError, ValueError):
            raise RunError(f"no such user: {name!r}") from None
        if entry.pw_uid == 0:
            raise RunError("--agent-user must not be root: root may always approve")
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def popen_options(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid,
                "extra_groups": os.getgrouplist(self.name, self.gid)}

    def environment(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def _start_proxy(args: argparse.Namespace, socket_path: Path, agent: AgentUser | None,
                 placeholders: dict[str, str]) -> tuple[subprocess.Popen[str], str, str | None]:
    host = args.listen.rpartition(":")[0] or "127.0.0.1"
    command = [*PYTHON, "-m", "agent_egress.proxy", "serve", "--listen", args.listen,
               "--socks-listen", f"{host}:0", "--approval-socket", str(socket_path)]
    for option, value in (("--config", args.config), ("--managed", args.managed),
                          ("--audit-log", args.audit_log),
                          ("--agent-uid", agent.uid if agent else None),
                          ("--ca-dir", args.ca_dir)):
        if value is not None:
            command += [option, str(value)]
    if not args.no_explain_https:
        command.append("--explain-https")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
                               stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    address, socks, block = None, None, False
    for line in process.stdout:
        if block and (variable := _PLACEHOLDER.fullmatch(line.strip())):
            placeholders[variable.group(1)] = variable.group(2)  # a stand-in, not a secret
        sys.stderr.write(f"[agent-egress] {line}")
        if match := _SOCKS.match(line):
            socks = match.group(1)
        elif match := _LISTENING.search(line):
            address = match.group(1)
        block = block or line.startswith("Set these in the agent's environment:")
        if line.strip().startswith("http_proxy="):
            break
    if address is None:
        process.wait()
        raise RunError(f"the proxy did not start (exit {process.returncode})")
    stdout = process.stdout
    threading.Thread(target=lambda: [sys.stderr.write(f"[agent-egress] {line}")
                                     for line in stdout], daemon=True).start()
    return process, f"http://{address}", f"socks5h://{socks}" if socks else None


def _same_file(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def _join(args: argparse.Namespace, placeholders: dict[str, str]) -> tuple[str, str | None]:
    """The URLs (HTTP, SOCKS5) of the running proxy to join, if it enforces the policy files
    run would use."""
    socket_path = find_socket(args.approval_socket)
    try:
        with ApprovalClient(socket_path, timeout=5) as client:
            status = client.request("status")["status"]
    except (ApprovalClientError, OSError, ValueError, KeyError) as exc:
        raise RunError(f"--join: no proxy answers at {socket_path} ({exc}); drop --join to "
                       "start one for this command") from None
    policy = status.get("policy")
    running = None if policy == "built-in default policy" else policy
    wanted, wanted_managed = user_policy_file(args.config), managed_policy_file(args.managed)
    if not _same_file(running, wanted) or not _same_file(status.get("managed"), wanted_managed):
        raise RunError(
            f"--join: the running proxy enforces policy {running or 'built-in'} (managed: "
            f"{status.get('managed') or 'none'}), not {wanted or 'built-in'} (managed: "
            f"{wanted_managed or 'none'}) as this run asks; drop --join to start a proxy with "
            "this run's policy")
    listen = status.get("listen") or []
    if not listen:
        raise RunError(f"--join: the proxy at {socket_path} reports no listen address")
    placeholders.update(status.get("agent_environment") or {})
    print(f"agent-egress run: joining the proxy at http://{printable(listen[0])} "
          f"(approvals: {printable(status.get('approval_separation', ''))})", file=sys.stderr)
    socks = status.get("socks") or []
    return f"http://{listen[0]}", f"socks5h://{socks[0]}" if socks else None


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("agent-egress run: give the command to run after --, e.g. "
              "agent-egress run -- curl https://pypi.org/simple/", file=sys.stderr)
        return 2
    started = None
    placeholders: dict[str, str] = {}  # the credentials' variables, from the proxy started
    try:
        if args.isolate:
            namespace_command([], [], args.isolate)  # refused now if it cannot be done
        agent = AgentUser.named(args.agent_user) if args.agent_user else None
        if args.isolate and agent is None and os.geteuid() == 0:
            raise RunError("--isolate as root needs --agent-user USER: a command running as "
                           "root owns the policy files and the system, and can reach past the "
                           "namespace through them even without capabilities")
        if args.join:
            url, socks = _join(args, placeholders)
        else:
            started, url, socks = _start_proxy(
                args, args.approval_socket or run_socket_path(), agent, placeholders)
    except (RunError, IsolationError) as exc:
        print(f"agent-egress run: {exc}", file=sys.stderr)
        return 2
    isolation = None
    if args.isolate:  # the command reaches the proxy through a bridge inside its namespace
        try:
            isolation = Isolation({"http": url, **({"socks": socks} if socks else {})},
                                  args.isolate)
        except OSError as exc:
            print(f"agent-egress run: cannot set up the bridge to the proxy: {exc}",
                  file=sys.stderr)
            _stop(started)
            return 2
        url, socks = inside_url(url), inside_url(socks) if socks else None
    env = {**os.environ, **placeholders, **proxy_environment(
        with_agent(url, args.agent_id), with_agent(socks, args.agent_id) if socks else None)}
    if socks:
        env.update(ssh_environment(os.environ))  # ssh (git over SSH) through `connect`
    trust_dir = None
    try:
        policy = chosen_policy(args.config, args.managed)  # the files the proxy enforces
        for variable in secret_variables(policy):
            env.pop(variable, None)  # an env: source is the proxy's to read, never the agent's
        if policy.credentials and policy.credentials.all and agent is None:
            print("agent-egress run: WARNING: the command runs as your user, so it can read "
                  "the proxy's memory, environment and keyring, and with them the "
                  "credentials' secrets; run it as another user (--agent-user) to keep them "
                  "out of its reach", file=sys.stderr)
        if (not args.join and not args.no_explain_https) or policy.interception_configured:
            trust_dir = Path(tempfile.mkdtemp(prefix="agent-egress-trust-"))
            env.update(trust_environment(local_ca(args), trust_dir, os.environ))
    except (CAError, PolicyError, OSError) as exc:
        print(f"agent-egress run: cannot prepare the command's environment: "
              f"{printable_lines(exc)}",
              file=sys.stderr)
        _stop(started)
        if isolation is not None:
            isolation.close()
        return 2
    options: dict[str, Any] = {}
    if agent is not None:
        env.update(agent.environment())
        # A session of its own: another user's command must not push keystrokes into this
        # terminal (TIOCSTI), where the invoking user's shell would run them.
        options = {**agent.popen_options(), "start_new_session": True}
    if isolation is not None:  # the bridge starts the command (as the agent user, if given)
        user = (agent.uid, agent.gid, options["extra_groups"]) if agent else None
        command, options = isolation.command(command, user), {}
    try:
        try:
            child = subprocess.Popen(command, env=env, **options)
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
        _stop(started)
        if isolation is not None:
            isolation.close()
        if trust_dir is not None:
            shutil.rmtree(trust_dir, ignore_errors=True)


def _stop(started: subprocess.Popen[str] | None) -> None:
    if started is not None:  # only a proxy this run started is stopped
        started.send_signal(signal.SIGTERM)
        try:
            started.wait(15)
        except subprocess.TimeoutExpired:
            started.kill()
