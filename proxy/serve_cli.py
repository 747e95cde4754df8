"""`agent-egress serve`: the checks before a proxy may start, then the proxy (serve.py)."""

from __future__ import annotations

import argparse
import base64
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from agent_egress.policy import load_policy
from agent_egress.policy.files import DEFAULT_MANAGED_PATH, policy_file_trust

from .approval_cli import add_socket_option
from .paths import default_socket_path, managed_policy_file, user_policy_file
from .textsafe import printable

if TYPE_CHECKING:
    from .managed_url import ManagedURL
    from .telemetry import Telemetry

EXIT_USAGE = 2


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 (port 0 picks a free port)")
    return host.strip("[]"), int(port)


def add_parsers(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the proxy",
                                description="Run the proxy. Without --config the built-in "
                                            "default policy applies.")
    serve.add_argument("--config", metavar="FILE", help="user policy file (TOML; default "
                       "$XDG_CONFIG_HOME/agent-egress/policy.toml if present, else built-in)")
    serve.add_argument("--managed", metavar="FILE",
                       help=f"managed (admin-owned) policy (default {DEFAULT_MANAGED_PATH} "
                            "if present)")
    serve.add_argument("--managed-url", metavar="URL",
                       help="fetch the managed policy from this URL instead of a file, with its "
                            "Ed25519 signature at URL.sig (docs/fleet.md)")
    serve.add_argument("--managed-key", metavar="PUBKEY_FILE", action="append", default=[],
                       help="public key (PEM) the --managed-url signature must verify with "
                            "(repeatable, for a key rotation)")
    serve.add_argument("--managed-refresh", metavar="SECONDS", type=float, default=60.0,
                       help="check --managed-url for a new version this often (default 60; "
                            "0: only at start)")
    serve.add_argument("--managed-cache", metavar="DIR",
                       help="where the last good --managed-url version is kept for a restart "
                            "without the network (default $XDG_STATE_HOME/agent-egress/managed)")
    serve.add_argument("--listen", metavar="HOST:PORT", type=_listen,
                       default=("127.0.0.1", 8080),
                       help="address to listen on (default 127.0.0.1:8080; port 0 picks one)")
    serve.add_argument("--socks-listen", metavar="HOST:PORT", type=_listen,
                       help="also accept SOCKS5 (for SSH, git over SSH, databases) on this "
                            "address, decided by the same policy (default: off; port 0 picks "
                            "one)")
    serve.add_argument("--upstream-proxy", metavar="URL",
                       help="a parent (corporate) proxy every allowed connection leaves "
                            "through, http://[USER:PASS@]HOST:PORT (network.no_upstream names "
                            "destinations reached directly)")
    serve.add_argument("--upstream-proxy-auth", metavar="SOURCE",
                       help="the parent proxy's USER:PASS from env:VAR, keyring:SERVICE/USER or "
                            "file:PATH (never logged), instead of in the URL")
    serve.add_argument("--state", metavar="URL",
                       help="share pending approvals, session grants and `always` decisions "
                            "with every proxy on this Redis: redis://[USER:PASS@]HOST:PORT/DB "
                            "(docs/fleet.md; default: this proxy alone)")
    serve.add_argument("--state-session-ttl", metavar="SECONDS", type=float,
                       default=12 * 3600,
                       help="how long a fleet 'session' decision lasts (default 43200: 12 h)")
    serve.add_argument("--audit-log", metavar="FILE",
                       help="audit log, JSON lines ('-' for stdout; default "
                            "$XDG_STATE_HOME/agent-egress/audit.jsonl)")
    serve.add_argument("--resolve", metavar="HOST=ADDR", action="append", default=[],
                       help="static address for a host, like curl --resolve (repeatable)")
    serve.add_argument("--dns-timeout", metavar="SECONDS", type=float, default=5.0,
                       help="timeout of the proxy's own DNS lookups (default 5)")
    serve.add_argument("--approver-uid", metavar="UID", type=int, action="append", default=[],
                       help="another uid allowed to approve (the proxy's own uid and root "
                            "always are; the socket's file permissions must let it in too)")
    serve.add_argument("--agent-uid", metavar="UID", type=int,
                       help="the uid the agent runs as, when known (run --agent-user sets it): "
                            "the proxy then says whether the agent could approve its own "
                            "requests or change the policy files")
    serve.add_argument("--managed-owner", metavar="UID", type=int, action="append", default=[],
                       help="an admin uid besides root that may own the managed policy "
                            "(repeatable); a managed file anyone else can change is refused")
    serve.add_argument("--explain-https", action="store_true",
                       help="answer refused HTTPS over TLS with the reason, as if the policy "
                            "said network.explain_https = true (clients must trust the CA; "
                            "'run' sets this)")
    serve.add_argument("--ca-dir", metavar="DIR", type=Path,
                       help="the local CA for intercepted hosts (default: "
                            "$XDG_DATA_HOME/agent-egress/ca)")
    add_socket_option(serve)
    serve.set_defaults(handler=cmd_serve)



def _listen_problem(host: str, port: int) -> str | None:
    """Why serve could not listen there, said in our words (mitmproxy's own message points
    at its --mode flag); bound the way mitmproxy binds, with SO_REUSEADDR."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            return (f"cannot listen on {shown}: {exc.strerror or exc}; is another proxy "
                    "running there? Choose another address with --listen HOST:PORT (port 0 "
                    "picks a free one)")
    return None


def parent_proxy(url: str | None, auth_source: str | None
                 ) -> tuple[tuple[str, int] | None, str | None]:
    """--upstream-proxy and --upstream-proxy-auth: the parent's address and the
    Proxy-Authorization value for it; ValueError says what is wrong (never the secret)."""
    if not url:
        if auth_source:
            raise ValueError("--upstream-proxy-auth needs --upstream-proxy")
        return None, None
    parts = urlsplit(url)
    try:
        port = parts.port if parts.port is not None else 3128
    except ValueError:
        port = -1
    if (parts.scheme != "http" or not parts.hostname or not 0 < port < 65536
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        # (Not echoed: a password could be in it.)
        raise ValueError("--upstream-proxy: expected http://[USER:PASS@]HOST:PORT and nothing "
                         "after the port")
    if parts.username:
        print("agent-egress: warning: credentials in --upstream-proxy are visible to every "
              "local user in the process list; use --upstream-proxy-auth env:VAR (or "
              "keyring:, file:)", file=sys.stderr)
    credentials = (f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                   if parts.username else None)
    if auth_source:
        from .secretstore import SecretError, read_secret

        try:
            credentials = read_secret("upstream proxy", auth_source)
        except SecretError as exc:
            raise ValueError(f"--upstream-proxy-auth: {exc}") from None
    if credentials is not None and ":" not in credentials:
        raise ValueError("the parent proxy's credentials must be USER:PASS")
    token = base64.b64encode(credentials.encode()).decode() if credentials else None
    return (parts.hostname, port), f"Basic {token}" if token else None


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    host, port = args.listen
    socks_listen = ""
    for listen_host, listen_port in filter(None, (args.listen, args.socks_listen)):
        if problem := _listen_problem(listen_host, listen_port):
            print(f"agent-egress: {problem}", file=sys.stderr)
            return EXIT_USAGE
    if args.socks_listen:
        socks_host, socks_port = args.socks_listen
        if (socks_host, socks_port) == (host, port) and port:
            print("agent-egress: --socks-listen needs an address of its own (not --listen's)",
                  file=sys.stderr)
            return EXIT_USAGE
        if socks_port == 0 and port == 0 and socks_host == host:
            socks_port = _free_port(socks_host)  # mitmproxy refuses two servers on HOST:0
        socks_listen = f"{socks_host}:{socks_port}"
    try:
        upstream, authorization = parent_proxy(args.upstream_proxy, args.upstream_proxy_auth)
    except ValueError as exc:
        print(f"agent-egress: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.state and urlsplit(args.state).password is not None:
        print("agent-egress: warning: the password in --state is visible to every local user "
              "in the process list; put it in REDISCLI_AUTH instead (docs/fleet.md)",
              file=sys.stderr)
    try:
        managed_source = _managed_url(args)
    except ValueError as exc:
        print(f"agent-egress: {exc}", file=sys.stderr)
        return EXIT_USAGE
    refusal, telemetry = _serve_preflight(args)
    if refusal is not None:
        return refusal
    extra: dict[str, Any] = {"dns_timeout": args.dns_timeout}
    if managed_source is not None:  # (the option exists only with the addon that reads it)
        extra["managed_refresh"] = args.managed_refresh
    if args.state:
        extra["state_session_ttl"] = args.state_session_ttl
    return serve(listen_host=host, listen_port=port,
                 policy_file=user_policy_file(args.config),
                 managed_file=None if managed_source else managed_policy_file(args.managed),
                 managed_source=managed_source, telemetry=telemetry,
                 audit_log=args.audit_log, resolve=args.resolve,
                 socket_path=args.approval_socket or default_socket_path(),
                 approver_uids=args.approver_uid, agent_uid=args.agent_uid,
                 managed_owners=args.managed_owner, extra=extra, state_url=args.state or "",
                 ca_directory=args.ca_dir, explain_https=args.explain_https,
                 socks_listen=socks_listen, upstream_proxy=upstream,
                 upstream_authorization=authorization)


def _managed_url(args: argparse.Namespace) -> ManagedURL | None:
    """The --managed-url source, or None; ValueError for options that do not go together."""
    if not args.managed_url:
        if args.managed_key or args.managed_cache:
            raise ValueError("--managed-key and --managed-cache go with --managed-url")
        return None
    if args.managed:
        raise ValueError("--managed and --managed-url both name the managed policy; give one")
    if args.managed_refresh < 0:
        raise ValueError("--managed-refresh: seconds, 0 or more")
    from .managed_url import open_source

    source = open_source(args.managed_url, args.managed_key, args.managed_cache)
    if args.managed_url.startswith("http://"):
        print(f"agent-egress: warning: {source.shown} is plain HTTP: the signature keeps the "
              "policy from being changed, but anyone on the way can see it or hold back new "
              "versions; prefer https://", file=sys.stderr)
    return source


def _serve_preflight(args: argparse.Namespace) -> tuple[int | None, Telemetry | None]:
    """Everything that must hold before a proxy starts: (exit status, None) if it must not.

    What is loaded here to check it is let go before `serve` loads the policy for itself: a
    large policy would otherwise be held twice for the proxy's whole life.
    """
    from .telemetry import Telemetry, TelemetryConfigError, telemetry_config

    config = user_policy_file(args.config)
    # (A managed policy from a URL is fetched by serve itself, before it listens.)
    managed = None if args.managed_url else managed_policy_file(args.managed)
    policy = load_policy(config, resolve=args.resolve, managed=managed)  # bad file: no start
    for problem in (*policy.problems, *policy.warnings):
        print(f"agent-egress: warning: {printable(problem)}", file=sys.stderr)
    trust = policy_file_trust(Path(config) if config else None,
                              Path(managed) if managed else None,
                              managed_owners=args.managed_owner, agent_uid=args.agent_uid,
                              protected=policy.settings.protected_file)
    for refusal in trust.refusals:
        print(f"agent-egress: refusing to start: {printable(refusal)}", file=sys.stderr)
    if trust.refusals:
        return EXIT_USAGE, None
    try:
        telemetry_settings = telemetry_config(policy.settings.telemetry,
                                              policy.settings.telemetry_required)
    except TelemetryConfigError as exc:
        print(f"agent-egress: {exc}", file=sys.stderr)
        return EXIT_USAGE, None
    if not telemetry_settings.enabled:
        return None, None
    print(f"telemetry: OTLP {telemetry_settings.protocol} to "
          f"{telemetry_settings.endpoint or 'the default endpoint'}", file=sys.stderr)
    return None, Telemetry(telemetry_settings)


