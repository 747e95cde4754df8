"""What a running proxy loads: only what it uses.

mitmdump's default addons pull in Flask, Jinja2, Werkzeug and ldap3, and OpenTelemetry's SDK
and exporters bring requests and gRPC; a proxy that does not use them must not carry them
(about 20 MiB of resident memory together). Checked on a real `serve` process with Python's
own import trace, after it has served a tunnel, a plain-HTTP request and a refusal.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import httpx
from conftest import policy_text
from proxyproc import ProxyProcess

_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$")
NOT_USED = ("flask", "jinja2", "werkzeug", "ldap3", "mitmproxy.tools", "opentelemetry.sdk",
            "opentelemetry.exporter", "requests", "grpc", "tomlkit", "tldextract")


def test_serve_loads_only_what_it_uses(tmp_path: Path, tls_origin, plain_origin,
                                       ca_file: Path) -> None:
    proxy = ProxyProcess(tmp_path, policy_text(tls_origin.port, plain_origin.port),
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": ""},  # export off
                         python_options=("-X", "importtime"))
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
        with httpx.Client(proxy=proxy.url, verify=context, trust_env=False) as client:
            assert client.get(f"https://allowed.test:{tls_origin.port}/hello").status_code == 200
            assert client.get(f"http://allowed.test:{plain_origin.port}/hello"
                              ).status_code == 200
            assert client.get(f"http://other.test:{plain_origin.port}/").status_code == 403
    finally:
        proxy.stop()
    modules = {match.group(1) for line in proxy.output
               if (match := _IMPORTED.match(line.rstrip()))}
    # The trace is read correctly: what serve does use is in it.
    assert {"agent_egress.proxy.serve", "mitmproxy.addons.proxyserver", "pydantic",
            "structlog"} <= modules
    assert sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in NOT_USED)
                  ) == []
