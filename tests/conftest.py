from __future__ import annotations

import os
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))

from origins import CountingServer  # noqa: E402
from proxyproc import ProxyProcess  # noqa: E402

# Every test, and every process a test starts, gets a HOME and XDG directories of its own: set
# here, before any fixture or subprocess exists. The real home is checked at the end.
HOME_VARIABLES = ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME",
                  "XDG_DATA_HOME", "XDG_RUNTIME_DIR")
REAL_HOME = Path(os.environ.get("AGENT_EGRESS_TEST_REAL_HOME") or Path.home())
# What agent-egress (or mitmproxy) would write in a home; each is watched for changes.
WATCHED = (".local/state/agent-egress", ".config/agent-egress", ".cache/agent-egress",
           ".mitmproxy")


def _snapshot(home: Path) -> dict[str, object]:
    state: dict[str, object] = {}
    for relative in WATCHED:
        root = home / relative
        if not root.exists():
            state[relative] = None
            continue
        state[relative] = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size)
                                 for p in root.rglob("*"))
    return state


def pytest_configure(config: pytest.Config) -> None:
    base = Path(tempfile.mkdtemp(prefix="agent-egress-test-home-"))
    for name in HOME_VARIABLES:
        directory = base / name.lower()
        directory.mkdir(mode=0o700)
        os.environ[name] = str(directory)
    config.stash[_HOME_KEY] = _snapshot(REAL_HOME)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_HOME_KEY, None)
    if before is not None and _snapshot(REAL_HOME) != before:
        changed = [k for k, v in _snapshot(REAL_HOME).items() if before.get(k) != v]
        print(f"\nFAILED: the test run wrote to the real home {REAL_HOME}: {changed}",
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_HOME_KEY = pytest.StashKey[dict]()


# Names the tests use; all are mapped to loopback with the proxy's own --resolve setting.
TLS_NAMES = ["allowed.test", "other.test", "evil.test", "sub.wild.test", "deep.sub.wild.test",
             "pypi.example.test", "git.example.test", "ws.example.test", "denied.evil.test",
             "ask.test", "ask2.test", "ask3.test", "ask4.test", "api.example.test",
             "npm.example.test", "h2.example.test", "mtls.example.test"]
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                "PIP_CERT", "NODE_EXTRA_CA_CERTS")


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def client_env(ca_file: Path) -> dict[str, str]:
    """An environment whose CA bundle variables trust only the test CA, and no proxy set."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in (
        "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update({name: str(ca_file) for name in CA_VARIABLES})
    return env


@pytest.fixture(scope="session")
def webroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("webroot")
    (root / "index.txt").write_text("index\n")
    return root


@pytest.fixture(scope="session")
def tls_origin(ca: trustme.CA, webroot: Path) -> Iterator[CountingServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*TLS_NAMES).configure_cert(context)
    server = CountingServer("tls-origin", webroot, context).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def plain_origin(webroot: Path) -> Iterator[CountingServer]:
    server = CountingServer("plain-origin", webroot, None).start()
    yield server
    server.stop()


def policy_text(*ports: int, default: str = "deny", extra: str = "") -> str:
    port_list = ", ".join(str(p) for p in (80, 443, *ports))
    resolve = "\n".join(f'"{name}" = "127.0.0.1"' for name in TLS_NAMES)
    return f"""version = 1
[network]
default = "{default}"
allow = ["allowed.test", "*.wild.test", "pypi.example.test", "git.example.test",
         "ws.example.test", "**.evil.test"]
deny = ["denied.evil.test", "*.pastebin.com"]
ports = [{port_list}]
allowed_cidrs = ["127.0.0.0/8", "::1/128"]
{extra}
[resolve]
{resolve}
"""


@pytest.fixture(scope="session")
def proxy(tls_origin: CountingServer, plain_origin: CountingServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One proxy shared by the end-to-end tests, with a policy covering the test origins."""
    process = ProxyProcess(tmp_path_factory.mktemp("proxy"),
                           policy_text(tls_origin.port, plain_origin.port))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def web80(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CountingServer]:
    """A plain-HTTP origin on port 80 of a loopback address of this run (auto-review scores
    web ports, so its tests need one; root only). One per test module: what reached it is
    that module's."""
    from reviewing import start_web80

    server = start_web80(tmp_path_factory.mktemp("web80"))
    yield server
    server.stop()
