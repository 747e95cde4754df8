"""`agent-egress serve`: mitmproxy embedded as a forward proxy with the agent-egress addons."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_egress.addons.approvals import Approvals
from agent_egress.addons.auditlog import AuditLog, default_audit_log_path
from agent_egress.addons.autoreview import AutoReview, ModelReviewer
from agent_egress.addons.connections import address_text, listen_addresses
from agent_egress.addons.credentials import CredentialBroker, CredentialSwap
from agent_egress.addons.enforce import Enforcer
from agent_egress.addons.failclosed import FailClosed
from agent_egress.addons.identity import AgentIdentity
from agent_egress.addons.intercept import ExplainedRefusals, Interception
from agent_egress.addons.limits import ClientLimits
from agent_egress.addons.managed_url import ManagedSource, ManagedURLPolicy
from agent_egress.addons.overrides import FormOverrides
from agent_egress.addons.pinning import UpstreamPinning
from agent_egress.addons.proxyport import ProxyPort
from agent_egress.addons.reload import PolicyReload
from agent_egress.addons.socks import SocksPort
from agent_egress.addons.tunnels import Tunnels
from agent_egress.addons.upstream import ParentProxy
from agent_egress.policy import BUILTIN, CompiledPolicy
from agent_egress.policy.engine import DEFAULT_PORTS, AutoReviewPolicy
from mitmproxy import ctx, exceptions, options

from .approval_server import ApprovalServer, SocketSetupError
from .master import lean_master
from .secretstore import SecretVault
from .textsafe import printable

if TYPE_CHECKING:
    from agent_egress.addons.fleet import FleetState

    from .ca import LocalCA
    from .telemetry import Telemetry


def proxy_env_lines(url: str, socks_url: str | None = None) -> list[str]:
    """Both cases: curl and others ignore upper-case HTTP_PROXY (a CGI safety rule), so
    without http_proxy plain HTTP would leave without the proxy. http_proxy comes last."""
    socks = [f"ALL_PROXY={socks_url}", f"all_proxy={socks_url}"] if socks_url else []
    return ["NO_PROXY=", "no_proxy=", *socks,
            *(f"{name}={url}" for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy",
                                           "http_proxy"))]


class Announce:
    """Tells the person starting the proxy where it listens, what the agent needs, and what
    does not hold (approvals not separated from the agent, policy files others can change)."""

    def __init__(self, socket_path: Path, status: Callable[[], dict[str, Any]],
                 parent: tuple[str, int] | None = None) -> None:
        self.socket_path = socket_path
        self.parent = parent  # the parent proxy's address (never its credentials)
        self.status = status  # with the credentials' placeholders ("agent_environment")

    def running(self) -> None:
        address = listen_addresses()[0]
        url = f"http://{address}"
        socks = listen_addresses(socks=True)
        policy = ctx.options.policy_file or "built-in default policy"
        if ctx.options.managed_policy_file:
            policy += f" under managed policy {ctx.options.managed_policy_file}"
        status = self.status()
        if managed := status.get("managed_url"):
            policy += f" under managed policy {managed['url']} " + (
                f"(serial {managed['serial']})" if managed["available"] else
                "(UNAVAILABLE: no verified version, every request is refused)")
        audit_log = ctx.options.audit_log or str(default_audit_log_path())
        print(f"agent-egress {version('agent-egress')} listening on {address}", flush=True)
        if socks:
            print(f"SOCKS5 listening on {socks[0]}", flush=True)
        print(f"policy: {policy}\naudit log: {audit_log}", flush=True)
        if self.parent is not None:
            print(f"parent proxy: http://{address_text(self.parent)} (allowed connections "
                  "leave through it)", flush=True)
        print(f"approval socket: {printable(self.socket_path)} (agent-egress watch)", flush=True)
        print(f"approvals: {status['approval_separation']}", flush=True)
        for warning in status.get("file_warnings", ()):
            print(f"WARNING: {printable(warning)}", flush=True)
        print("Set these in the agent's environment:", flush=True)
        # Placeholders first (`run` reads this block up to http_proxy): not secrets, the
        # stand-ins the proxy swaps for them.
        for name, placeholder in status.get("agent_environment", {}).items():
            print(f"  {name}={placeholder}", flush=True)
        for line in proxy_env_lines(url, f"socks5h://{socks[0]}" if socks else None):
            print(f"  {line}", flush=True)
        # Said once: every addon in the chain is visited on every hook of every connection,
        # so this one leaves it (after the chain has finished calling `running`).
        asyncio.get_running_loop().call_soon(ctx.master.addons.remove, self)


def fleet_state(audit: AuditLog, approvals: Approvals,
                reload_policy: Callable[[], object]) -> FleetState:
    """The fleet's shared state (redis, loaded only with --state: it brings OpenTelemetry's
    SDK with it)."""
    from agent_egress.addons.fleet import FleetState

    return FleetState(audit, approvals, reload_policy)


def review_model(settings: AutoReviewPolicy) -> ModelReviewer:
    """The model reviewer for auto-review (httpx loaded only when a model is configured)."""
    from .review_model import ReviewModel

    return ReviewModel(settings)


class LazyCA:
    """The local CA, created (or loaded) when the first intercepted tunnel needs it: a proxy
    whose policy intercepts nothing never touches it."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._ca: LocalCA | None = None

    def __call__(self) -> LocalCA:
        if self._ca is None:
            from .ca import LocalCA

            ca = LocalCA(self.directory) if self.directory else LocalCA.default()
            ca.ensure()
            self._ca = ca
        return self._ca


def serve(*, listen_host: str, listen_port: int, policy_file: str | None,
          managed_file: str | None, audit_log: str | None, resolve: list[str], socket_path: Path,
          approver_uids: Iterable[int] = (), telemetry: Telemetry | None = None,
          agent_uid: int | None = None, managed_owners: Iterable[int] = (),
          extra: dict[str, Any] | None = None, ca_directory: Path | None = None,
          explain_https: bool = False, socks_listen: str = "",
          upstream_proxy: tuple[str, int] | None = None,
          upstream_authorization: str | None = None, state_url: str = "",
          managed_source: ManagedSource | None = None) -> int:
    local_ca = LazyCA(ca_directory)

    async def main() -> int:
        opts = options.Options(listen_host=listen_host, listen_port=listen_port)
        proxy = lean_master(opts)
        audit = AuditLog()
        # The corporate proxy allowed connections leave through (serve --upstream-proxy).
        parent = (ParentProxy(lambda: enforcer.policy, upstream_proxy, upstream_authorization)
                  if upstream_proxy else None)
        pinning = UpstreamPinning(parent.is_parent) if parent else UpstreamPinning()
        # `always` decisions are written and loaded by the enforcer, created just below; in a
        # fleet (serve --state) they are in Redis, and join the user layer from there.
        if state_url:
            approvals = Approvals(audit, write_rule=lambda *rule: fleet.written(*rule),
                                  reload_policy=lambda: enforcer.reload(),
                                  unavailable=lambda: fleet.unavailable())
        else:
            approvals = Approvals(audit, write_rule=lambda *rule: enforcer.write_rule(*rule),
                                  reload_policy=lambda: enforcer.load_written())
        fleet = fleet_state(audit, approvals, lambda: enforcer.reload()) if state_url else None
        def policy() -> CompiledPolicy | None:
            return enforcer.policy

        vault = SecretVault()
        broker = CredentialBroker(audit, pinning, policy, vault)
        interception = Interception(audit, pinning, policy, local_ca,
                                    explain_https=explain_https)
        port = ProxyPort(audit, interception.upstream_failure)
        review = AutoReview(audit, approvals, policy, model_factory=review_model)
        # serve --managed-url: the managed layer is the verified text it holds, refreshed.
        managed_url = (ManagedURLPolicy(managed_source, audit,
                                        lambda why, **fields: reloader.reload(why, **fields))
                       if managed_source else None)
        enforcer = Enforcer(audit, pinning, approvals, discard_body=port.discard_body,
                            review=review, parent=parent,
                            managed=managed_url.layer if managed_url else None,
                            shared_rules=lambda: fleet.rules(enforcer.policy.settings.ports
                                                             if enforcer.policy else DEFAULT_PORTS)
                            if fleet else ())
        reloader = PolicyReload(enforcer, audit)
        tunnels = Tunnels(audit, pinning, policy, port.http_layer, interception, parent)
        audit.before_stop(tunnels.proxy_stopping)
        if telemetry is not None:
            from agent_egress.addons.telemetry import TelemetrySink

            audit.add_sink(TelemetrySink(telemetry, lambda: tunnels.open_count,
                                         lambda: len(approvals.pending)).on_event)
        async def explain_running(target: str) -> dict[str, Any]:
            """`policy explain --running`: this proxy's policy and session approvals."""
            from .explain import explain

            def session(host: str, port: int) -> tuple[str, str, str] | None:
                verdict = approvals.session_verdict(host, port)
                return (verdict.action.value, verdict.scope, verdict.actor) if verdict else None

            assert enforcer.policy is not None
            result = await explain(
                enforcer.policy, target, dns_timeout=ctx.options.dns_timeout, session=session,
                files={"user": ctx.options.policy_file or BUILTIN,
                       "managed": ctx.options.managed_policy_file or None})
            return {**result, "running": True}

        def status() -> dict[str, Any]:
            broker.sync(enforcer.policy)  # secrets read (and placeholders made) at start
            return {**reloader.status(), **(fleet.status() if fleet else {}),
                    "agent_environment": vault.environment(),
                    "managed_url": managed_url.status() if managed_url else None}

        server = ApprovalServer(approvals, audit, socket_path, approver_uids, status=status,
                                agent_uid=agent_uid, explain=explain_running, review=review,
                                fleet_decide=fleet.decide if fleet else None)
        # Order matters: identity and ClientLimits (a complete head stops its deadline, before
        # a request may be held) before the enforcer; requests in a tunnel kept to explain its
        # refusal are answered before the enforcer too (never held again), and a misdirected
        # credential placeholder is refused before any decision; interception after
        # it (it acts on the enforcer's CONNECT decision) and before Tunnels (which asks it);
        # FailClosed last, to refuse what nothing decided. The managed policy from a URL right
        # after the log: its start-up rejections are logged before the policy is loaded.
        proxy.addons.add(audit, *([managed_url] if managed_url else []), pinning, approvals,
                          SocksPort(audit), port,
                          AgentIdentity(policy, audit),
                          ClientLimits(audit, policy),
                          ExplainedRefusals(interception, audit, port.discard_body),
                          broker, enforcer, CredentialSwap(broker),
                          FormOverrides(audit, policy), interception, tunnels, reloader,
                          Announce(socket_path, server.full_status, upstream_proxy),
                          FailClosed(audit))
        if parent is not None:
            proxy.addons.add(parent)  # the parent's credentials on the CONNECTs sent to it
        if fleet is not None:
            proxy.addons.add(fleet)  # shared approvals: on no request's path, only held ones'
        if managed_url is not None:
            await managed_url.start()  # before the policy is loaded and the proxy listens
        try:
            opts.update(
                # Nothing connects upstream before the policy has decided and pinned an address.
                connection_strategy="lazy",
                # No raw TCP fallback anywhere (a 101 to an unknown protocol closes the client).
                rawtcp=False,
                # Plain-HTTP bodies are streamed, never buffered whole in the proxy.
                stream_large_bodies="1m",
                termlog_verbosity="warn",
                policy_file=policy_file or "",
                managed_policy_file=managed_file or "",
                resolve_overrides=resolve,
                audit_log=audit_log or "",
                managed_owners=list(managed_owners),
                agent_uid=-1 if agent_uid is None else agent_uid,
                socks_listen=socks_listen,
                **({"state_url": state_url} if state_url else {}),
                **(extra or {}),
            )
        except exceptions.OptionsError as exc:
            print(f"agent-egress: {printable(exc)}", file=sys.stderr)
            return 2
        try:
            await server.start()
        except (SocketSetupError, OSError) as exc:
            audit.emit("approval.socket_refused", path=str(socket_path), reason=str(exc))
            print(f"agent-egress: cannot open the approval socket: {exc}", file=sys.stderr)
            return 2
        # What is loaded by now (modules, the policy: 300k objects at 100k rules) lives as long
        # as the proxy. Out of the collector's reach, it is not walked by every full collection
        # (0.1 s each at 100k rules, a stall of every connection: the p99 under load). No
        # connection is open yet, so nothing that will become garbage is frozen with it.
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, proxy.shutdown)
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
        try:
            await proxy.run()
        finally:
            if not await server.stop():
                print(f"agent-egress: {socket_path} is no longer the socket this proxy created; "
                      "left it in place", file=sys.stderr)
            await review.done()
            if telemetry is not None:
                telemetry.shutdown()
        return 0

    status = asyncio.run(main())
    sys.stdout.flush()
    return status
