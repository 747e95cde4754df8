"""serve's own terminal log shows agent-chosen text escaped (a policy file an agent could
write, a host in an error): it must not redraw the terminal of whoever runs the proxy."""

from __future__ import annotations

import time

from conftest import policy_text
from proxyproc import ProxyProcess


def test_reload_failure_is_logged_escaped(tmp_path, tls_origin, plain_origin) -> None:
    process = ProxyProcess(tmp_path / "p", policy_text(tls_origin.port, plain_origin.port))
    try:
        mark = process.mark()
        # TOML escapes: the key itself holds ESC, BEL and a bidi override.
        hostile = 'version = 1\n[network]\n"k\\u001b[2J\\u001b]0;pwned\\u0007\\u202e" = 1\n'
        process.policy_path.write_text(hostile)
        process.wait_for_event(lambda e: e["event"] == "policy.rejected", timeout=10, after=mark)
        time.sleep(0.3)  # the log line follows the event
    finally:
        process.stop()
    output = "".join(process.output)
    assert "policy reload failed" in output
    assert "\x1b[2J" not in output and "\x07" not in output and "\u202e" not in output
    assert "\\x1b[2J" in output and "\\u202e" in output
