"""mitmproxy's master with only the addons a forward proxy needs.

Importing any `mitmproxy.addons.X` first runs `mitmproxy/addons/__init__.py`, which imports
all ~35 default addons for `default_addons()` and, through them, Flask, Jinja2, Werkzeug and
ldap3: about 13 MiB of resident memory per proxy for code `serve` never calls. Only
mitmproxy's own tools (mitmdump, mitmweb, mitmproxy) call `default_addons()`, and `serve`
never imports them, so the package is registered without running that file; its submodules
import as usual. Where the full package is already loaded (a test process, say), it is used.
"""

from __future__ import annotations

import importlib.util
import logging
import sys


def _register_without_init(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not an installed package")
    package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not executed
    sys.modules[name] = package
    setattr(sys.modules[name.rpartition(".")[0]], name.rpartition(".")[2], package)


_register_without_init("mitmproxy.addons")

# These need the registration above (mitmproxy.master imports mitmproxy.addons too).
from mitmproxy import log, master, options  # noqa: E402
from mitmproxy.addons import (  # noqa: E402
    block,
    core,
    disable_h2c,
    errorcheck,
    proxyserver,
)

from .textsafe import printable, printable_lines  # noqa: E402


def lean_master(opts: options.Options) -> master.Master:
    """mitmproxy with only the addons a forward proxy needs.

    mitmdump loads ~35 addons (replay, scripts, header rewriting, HAR export...), and every
    hook of every request visits each of them; on this hot path that dispatch costs more than
    the policy itself. Block (refuse clients from public addresses) and DisableH2C are kept for
    the protections they give. NextLayer and TlsConfig are left out on purpose: their fallbacks
    (raw TCP for unknown bytes, TLS interception with a CA written to ~/.mitmproxy) are ways
    around the policy; the proxy's own ProxyPort and Tunnels addons choose every layer.
    """
    proxy = master.Master(opts, with_termlog=True)
    terminal = proxy.addons.get("termlog").logger
    terminal.formatter = EscapingFormatter(terminal.has_vt_codes)
    proxy.addons.add(core.Core(), block.Block(), disable_h2c.DisableH2C(),
                     proxyserver.Proxyserver(), errorcheck.ErrorCheck())
    return proxy


class EscapingFormatter(log.MitmFormatter):
    """serve's own log lines, with agent-chosen text in them (a host, a header, a policy
    error quoting a key) shown escaped: it must not redraw the terminal of whoever runs it."""

    def format(self, record: logging.LogRecord) -> str:
        message = printable(record.getMessage())
        if record.exc_info:
            message += "\n" + printable_lines(self.formatException(record.exc_info))
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args, safe.exc_info, safe.exc_text = message, None, None, None
        return super().format(safe)
