"""A fleet: three real `serve` processes sharing approvals through a real redis-server on
loopback (`serve --state`), and approvers answering through any proxy's socket or through the
shared state itself (`--state`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from holding import ask_policy, start_curl
from proxyproc import ProxyProcess, owner_args
from redisproc import RedisProcess


@pytest.fixture
def redis(tmp_path):
    server = RedisProcess(tmp_path / "redis")
    yield server
    server.kill()


def fleet_of(tmp_path, redis, policy: str, count: int = 3, *extra: str) -> list[ProxyProcess]:
    proxies = []
    try:
        for index in range(count):
            proxies.append(ProxyProcess(tmp_path / f"proxy{index}", policy, "--state",
                                        redis.url, *extra))
        for proxy in proxies:
            proxy.wait_for_event(lambda e: e["event"] == "state.connected", timeout=10)
    except BaseException:
        for proxy in proxies:
            proxy.stop()
        raise
    return proxies


@pytest.fixture
def fleet(tmp_path, redis, tls_origin, plain_origin):
    proxies = fleet_of(tmp_path, redis, ask_policy(tls_origin.port, plain_origin.port))
    yield proxies
    for proxy in proxies:
        proxy.stop()


def state_cli(proxy: ProxyProcess, redis: RedisProcess, *args: str) -> subprocess.CompletedProcess:
    """An approver's command on the shared state (with the proxy's HOME, never the real one)."""
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args, "--state",
                           redis.url], capture_output=True, text=True, timeout=30,
                          env=proxy.env(), stdin=subprocess.DEVNULL)


def fleet_pending(proxy: ProxyProcess, redis: RedisProcess, predicate=lambda p: True,
                  count: int = 1, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = state_cli(proxy, redis, "pending", "--json")
        assert result.returncode == 0, result.stderr
        found = [item for item in json.loads(result.stdout) if predicate(item)]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError("no such pending approval in the shared state")


def test_a_hold_on_one_proxy_is_released_through_another(fleet, redis, tls_origin, client_env):
    first, second, third = fleet
    url = f"https://ask.test:{tls_origin.port}/hello"
    curl = start_curl(client_env, first, url)
    [pending] = fleet_pending(third, redis, lambda p: p["host"] == "ask.test")
    assert pending["port"] == tls_origin.port and pending["proxy"]
    listing = state_cli(third, redis, "pending")
    assert f"{pending['id']}  ask.test:{tls_origin.port}  CONNECT" in listing.stdout
    # The second proxy's own socket: a decision there is made for the fleet.
    approved = second.cli("approve", pending["id"])
    assert approved.returncode == 0, approved.stderr
    assert "1 held destination decided for the fleet" in approved.stdout
    out, err = curl.communicate(timeout=30)
    assert curl.returncode == 0, err
    assert "hello from tls-origin" in out
    decided = first.wait_for_event(lambda e: e["event"] == "approval.decided")
    assert decided["approval_id"] == pending["id"] and decided["scope"] == "once"
    assert decided["actor"].startswith("redis:default/uid:") and "@" in decided["actor"]
    # Then through the shared state itself: the Redis user and the local account decide.
    again = start_curl(client_env, first, url)
    [pending] = fleet_pending(second, redis, lambda p: p["host"] == "ask.test")
    result = state_cli(second, redis, "approve", f"ask.test:{tls_origin.port}")
    assert result.returncode == 0, result.stderr
    assert again.communicate(timeout=30)[0].count("hello from tls-origin") == 1
    event = first.wait_for_event(lambda e: e["event"] == "approval.decided"
                                 and e["approval_id"] == pending["id"])
    user = os.environ.get("USER") or ""
    assert event["actor"].startswith(f"redis:default/{user}") or event["actor"].startswith(
        "redis:default/"), event
    assert f"uid:{os.getuid()}" in event["actor"]
    # Nothing is left in the shared state once decided.
    assert fleet_pending(first, redis, count=0) == []
    assert redis.command("KEYS", "agent-egress:hold:*").strip() == ""


def test_holds_for_one_destination_coalesce_across_proxies(fleet, redis, tls_origin,
                                                          client_env):
    url = f"https://ask2.test:{tls_origin.port}/hello"
    curls = [start_curl(client_env, fleet[0], url)]
    [pending] = fleet_pending(fleet[0], redis, lambda p: p["host"] == "ask2.test")
    curls += [start_curl(client_env, proxy, url) for proxy in fleet[1:]]
    for proxy in fleet[1:]:
        joined = proxy.wait_for_event(lambda e: e["event"] == "approval.joined")
        assert joined["approval_id"] == pending["id"]
    assert len(fleet_pending(fleet[2], redis)) == 1  # one question for the person
    before = tls_origin.connections
    result = state_cli(fleet[1], redis, "approve", pending["id"])
    assert result.returncode == 0, result.stderr
    for curl in curls:
        out, err = curl.communicate(timeout=30)
        assert curl.returncode == 0 and "hello from tls-origin" in out, err
    assert tls_origin.connections - before == 3
    for proxy in fleet:
        allowed = proxy.wait_for_event(lambda e: e.get("reason") == "approved")
        assert allowed["approval_id"] == pending["id"]


def test_always_is_shared_and_shown(fleet, redis, tls_origin, client_env):
    result = state_cli(fleet[0], redis, "approve", f"ask3.test:{tls_origin.port}",
                       "--scope", "always")
    assert result.returncode == 0, result.stderr
    assert "stored in the shared state" in result.stdout
    for proxy in fleet:
        proxy.wait_for_event(lambda e: e["event"] == "policy.loaded"
                             and e["rules"] >= 3, timeout=10)
    curl = start_curl(client_env, fleet[2], f"https://ask3.test:{tls_origin.port}/hello")
    out, err = curl.communicate(timeout=30)
    assert "hello from tls-origin" in out, err
    allowed = fleet[2].wait_for_event(lambda e: e.get("reason") == "allowlist")
    # The port is one of the policy's ports: the rule names the host, as a user file's would.
    assert allowed["rule"] == "ask3.test" and allowed["layer"] == "user"
    assert not fleet[2].events("approval.requested")  # decided by rule, never held
    shown = fleet[1].cli("policy", "show")
    assert f"always allow ask3.test:{tls_origin.port}" in shown.stdout, shown.stdout
    health = fleet[1].cli("health")
    assert "shared state: redis://127.0.0.1" in health.stdout and "connected" in health.stdout


def test_always_in_the_fleet_is_bounded_by_the_managed_policy(tmp_path, redis, tls_origin,
                                                              plain_origin, client_env):
    managed = tmp_path / "managed.toml"
    managed.write_text('version = 1\n[network]\ndeny = ["ask4.test"]\n')
    managed.chmod(0o644)
    proxies = fleet_of(tmp_path, redis, ask_policy(tls_origin.port, plain_origin.port), 1,
                       "--managed", str(managed), *owner_args())
    try:
        result = state_cli(proxies[0], redis, "approve", "ask4.test", "--scope", "always")
        assert result.returncode == 0, result.stderr
        proxies[0].wait_for_event(lambda e: e["event"] == "policy.loaded" and e["rules"] >= 4)
        curl = start_curl(client_env, proxies[0], f"https://ask4.test:{tls_origin.port}/")
        assert "403" in curl.communicate(timeout=30)[0]
        refused = proxies[0].wait_for_event(lambda e: e.get("host") == "ask4.test"
                                            and e["event"] == "request.decided")
        assert refused["reason"] == "denylist" and refused["layer"] == "managed"
    finally:
        proxies[0].stop()


def test_a_session_grant_reaches_proxies_that_join_later(tmp_path, redis, tls_origin,
                                                         plain_origin, client_env):
    policy = ask_policy(tls_origin.port, plain_origin.port)
    [first] = fleet_of(tmp_path / "a", redis, policy, 1)
    try:
        result = state_cli(first, redis, "approve", "ask.test", "--scope", "session")
        assert result.returncode == 0, result.stderr
        [late] = fleet_of(tmp_path / "b", redis, policy, 1)  # started after the decision
        try:
            curl = start_curl(client_env, late, f"https://ask.test:{tls_origin.port}/hello")
            out, err = curl.communicate(timeout=30)
            assert "hello from tls-origin" in out, err
            decided = late.wait_for_event(lambda e: e["event"] == "approval.decided")
            assert decided["scope"] == "session" and decided["actor"].startswith("redis:")
        finally:
            late.stop()
    finally:
        first.stop()


def test_redis_killed_mid_hold_and_restarted(fleet, redis, tls_origin, plain_origin,
                                             client_env):
    first, second, _ = fleet
    url = f"https://ask.test:{tls_origin.port}/hello"
    held = start_curl(client_env, first, url)
    [pending] = fleet_pending(first, redis, lambda p: p["host"] == "ask.test")
    redis.kill()
    mark = first.mark()
    first.wait_for_event(lambda e: e["event"] == "state.unavailable", timeout=15)
    second.wait_for_event(lambda e: e["event"] == "state.unavailable", timeout=15)
    # Decisions by policy go on; a new hold is refused at once, never allowed.
    allowed = subprocess.run(["curl", "-sS", "-x", second.url, "--max-time", "20",
                              f"https://allowed.test:{tls_origin.port}/hello"],
                             env=client_env, capture_output=True, text=True, timeout=30)
    assert "hello from tls-origin" in allowed.stdout, allowed.stderr
    started = time.monotonic()
    refused = subprocess.run(["curl", "-sS", "-i", "-x", second.url, "--max-time", "20",
                              f"http://ask2.test:{plain_origin.port}/"], env=client_env,
                             capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 5
    assert "403" in refused.stdout and "approval_unavailable" in refused.stdout + str(
        second.events("request.decided"))
    event = second.wait_for_event(lambda e: e.get("host") == "ask2.test"
                                  and e["event"] == "request.decided")
    assert event["decision"] == "deny" and event["reason"] == "approval_unavailable"
    health = first.cli("health")
    assert health.returncode == 0 and "UNAVAILABLE" in health.stdout, health.stdout
    assert held.poll() is None  # the held request still waits, for its timeout
    # Back: the proxies reconnect by themselves and share the hold again (Redis forgot it).
    redis.start()
    first.wait_for_event(lambda e: e["event"] == "state.connected", after=mark, timeout=15)
    [again] = fleet_pending(second, redis, lambda p: p["host"] == "ask.test")
    assert again["id"] == pending["id"]
    assert state_cli(second, redis, "approve", pending["id"]).returncode == 0
    out, err = held.communicate(timeout=30)
    assert "hello from tls-origin" in out, err
    assert "connected since" in first.cli("health").stdout


def test_a_proxy_whose_state_is_down_from_the_start_refuses_holds(tmp_path, tls_origin,
                                                                  plain_origin, client_env):
    from origins import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proxy = ProxyProcess(tmp_path / "p", ask_policy(tls_origin.port, plain_origin.port),
                         "--state", url)
    try:
        refused = subprocess.run(["curl", "-sS", "-i", "-x", proxy.url, "--max-time", "20",
                                  f"http://ask.test:{plain_origin.port}/"], env=client_env,
                                 capture_output=True, text=True, timeout=30)
        assert "403" in refused.stdout
        event = proxy.wait_for_event(lambda e: e["event"] == "request.decided")
        assert event["reason"] == "approval_unavailable"
        assert "UNAVAILABLE" in proxy.cli("health").stdout
        decided = proxy.cli("approve", "ask.test", "--scope", "session")
        assert decided.returncode != 0 and "unreachable" in decided.stderr
    finally:
        proxy.stop()


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://"])
def test_a_bad_state_url_is_refused(tmp_path, url):
    result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "serve", "--listen",
                             "127.0.0.1:0", "--state", url, "--approval-socket",
                             str(tmp_path / "s")], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "HOME": str(tmp_path),
                                 "XDG_CONFIG_HOME": str(tmp_path / "c"),
                                 "XDG_STATE_HOME": str(tmp_path / "s2")},
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "--state must be a Redis URL" in result.stderr


def test_the_gateway_manifests_acl_users_suffice_and_name_the_approver(tmp_path, tls_origin,
                                                                      plain_origin,
                                                                      client_env):
    from pathlib import Path

    from ruamel.yaml import YAML

    manifest = Path(__file__).parents[1] / "docker" / "kubernetes-gateway.yaml"
    [secret] = [d for d in YAML(typ="safe").load_all(manifest.read_text())
                if d["kind"] == "Secret"]
    acl = tmp_path / "users.acl"
    acl.write_text(secret["stringData"]["users.acl"])
    server = RedisProcess(tmp_path / "redis", None, "--aclfile", str(acl))
    base = f"127.0.0.1:{server.port}/0"
    try:
        proxy = ProxyProcess(tmp_path / "p", ask_policy(tls_origin.port, plain_origin.port),
                             "--state", f"redis://egress-proxy:CHANGE-ME-proxy@{base}")
        try:
            proxy.wait_for_event(lambda e: e["event"] == "state.connected", timeout=10)
            assert "CHANGE-ME" not in "".join(proxy.output) + proxy.audit_path.read_text()
            curl = start_curl(client_env, proxy, f"https://ask.test:{tls_origin.port}/hello")
            approver = f"redis://alice:CHANGE-ME-alice@{base}"
            for _ in range(100):
                listed = subprocess.run(
                    [sys.executable, "-m", "agent_egress.proxy", "pending", "--json",
                     "--state", approver], capture_output=True, text=True, timeout=30,
                    env=proxy.env(), stdin=subprocess.DEVNULL)
                assert listed.returncode == 0, listed.stderr
                if json.loads(listed.stdout):
                    break
                time.sleep(0.1)
            decided = subprocess.run(
                [sys.executable, "-m", "agent_egress.proxy", "approve", "ask.test",
                 "--scope", "always", "--state", approver], capture_output=True, text=True,
                timeout=30, env=proxy.env(), stdin=subprocess.DEVNULL)
            assert decided.returncode == 0, decided.stderr
            assert "hello from tls-origin" in curl.communicate(timeout=30)[0]
            event = proxy.wait_for_event(lambda e: e["event"] == "approval.decided")
            assert event["actor"].startswith("redis:alice/") and event["scope"] == "always"
            # No password, or a wrong one: refused by Redis, and said so.
            for url in (f"redis://{base}", f"redis://alice:wrong@{base}"):
                refused = subprocess.run(
                    [sys.executable, "-m", "agent_egress.proxy", "pending", "--state", url],
                    capture_output=True, text=True, timeout=30, env=proxy.env(),
                    stdin=subprocess.DEVNULL)
                assert refused.returncode != 0
                assert "shared state redis://" in refused.stderr and "wrong" not in refused.stderr
        finally:
            proxy.stop()
    finally:
        server.kill()


def test_a_fleet_session_grant_lapses_with_its_ttl(tmp_path, redis, tls_origin, plain_origin,
                                                   client_env):
    [proxy] = fleet_of(tmp_path, redis, ask_policy(tls_origin.port, plain_origin.port), 1,
                       "--state-session-ttl", "2")
    try:
        url = f"http://ask.test:{plain_origin.port}/hello"
        result = proxy.cli("approve", "ask.test", "--scope", "session")
        assert result.returncode == 0, result.stderr
        proxy.wait_for_event(lambda e: e["event"] == "approval.decided")
        ttl = int(redis.command("TTL", "agent-egress:session:ask.test:*").strip())
        assert 0 < ttl <= 2
        first = subprocess.run(["curl", "-sS", "-x", proxy.url, "--max-time", "20", url],
                               env=client_env, capture_output=True, text=True, timeout=30)
        assert "hello from plain-origin" in first.stdout, first
        assert not proxy.events("approval.requested")  # the grant, in this proxy's memory
        time.sleep(2.5)
        again = start_curl(client_env, proxy, url)
        [pending] = fleet_pending(proxy, redis, lambda p: p["host"] == "ask.test")
        assert state_cli(proxy, redis, "deny", pending["id"]).returncode == 0
        assert "403" in again.communicate(timeout=30)[0]
    finally:
        proxy.stop()


def test_watch_state_without_a_terminal_lists_the_fleet(fleet, redis, plain_origin,
                                                        client_env):
    curl = start_curl(client_env, fleet[1], f"http://ask.test:{plain_origin.port}/")
    [pending] = fleet_pending(fleet[0], redis)
    result = state_cli(fleet[2], redis, "watch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{pending['id']}  ask.test:{plain_origin.port}  HTTP GET /")
    assert state_cli(fleet[0], redis, "deny", pending["id"]).returncode == 0
    assert "403" in curl.communicate(timeout=30)[0]


@pytest.mark.filterwarnings("ignore:.*forkpty.*:DeprecationWarning")
def test_watch_state_in_a_terminal_answers_a_hold_on_another_proxy(fleet, redis, tls_origin,
                                                                    client_env):
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: agent-egress watch --state on a real terminal
        os.execve(sys.executable, [sys.executable, "-m", "agent_egress.proxy", "watch",
                                   "--state", redis.url], fleet[0].env())
    output = bytearray()

    def read_until(marker: bytes, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while marker not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, bytes(output)
            if select.select([fd], [], [], remaining)[0]:
                output.extend(os.read(fd, 4096))

    try:
        read_until(b"watching redis://127.0.0.1")
        curl = start_curl(client_env, fleet[2], f"https://ask.test:{tls_origin.port}/hello")
        read_until(b"[q]uit?")
        assert b"ask.test:%d  CONNECT" % tls_origin.port in output
        os.write(fd, b"o")
        out, err = curl.communicate(timeout=30)
        assert "hello from tls-origin" in out, err
        read_until(b"-> allow")
        os.write(fd, b"q")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    event = fleet[2].wait_for_event(lambda e: e["event"] == "approval.decided")
    assert event["scope"] == "once" and event["actor"].startswith("redis:default/")


def test_junk_in_the_shared_state_is_ignored_with_events(tmp_path, redis, tls_origin,
                                                         plain_origin, client_env):
    [proxy] = fleet_of(tmp_path, redis, ask_policy(tls_origin.port, plain_origin.port), 1)
    try:
        redis.command("PUBLISH", "agent-egress:events", '{"event": "decided", "ids": 5}')
        redis.command("PUBLISH", "agent-egress:events", "not json")
        redis.command("PUBLISH", "agent-egress:events",
                      '{"event": "decided", "ids": [], "host": "ask.test", "port": "x", '
                      '"decision": "allow", "scope": "session", "actor": "me"}')
        ignored = proxy.wait_for_event(lambda e: e["event"] == "state.message_ignored")
        assert "TypeError" in ignored["error"]
        refused = proxy.wait_for_event(lambda e: e["event"] == "approval.refused")
        assert refused["target"] == "ask.test:x"
        # Wildcards, networks and nonsense as `always` rules: never applied.
        for field, value in (("a", '{"decision": "allow", "host": "*.evil.test", "port": null}'),
                             ("b", '{"decision": "allow", "host": "10.0.0.0/8", "port": null}'),
                             ("c", '{"decision": "allow", "host": "ask2.test", "port": "443"}'),
                             ("d", "[1, 2]")):
            redis.command("HSET", "agent-egress:always", field, value)
        redis.command("SET", "agent-egress:pending:deadbeef", "{broken")
        redis.command("ZADD", "agent-egress:pending", str(time.time() + 60), "deadbeef")
        redis.command("PUBLISH", "agent-egress:events",
                      '{"event": "decided", "ids": [], "host": "x.test", "port": null, '
                      '"decision": "allow", "scope": "always", "actor": "me"}')
        proxy.wait_for_event(lambda e: e["event"] == "state.rule_ignored"
                             and "ask2.test" in e["rule"])
        assert len(proxy.events("state.rule_ignored")) == 3
        assert fleet_pending(proxy, redis, count=0) == []  # the broken record is skipped
        curl = start_curl(client_env, proxy, f"http://evil.test:{plain_origin.port}/hello")
        [pending] = fleet_pending(proxy, redis, lambda p: p["host"] == "evil.test")
        assert state_cli(proxy, redis, "deny", pending["id"]).returncode == 0
        assert "403" in curl.communicate(timeout=30)[0]
        assert not proxy.events("state.unavailable")
        assert proxy.process.poll() is None
    finally:
        proxy.stop()
