"""`GET /healthz` sent to the proxy itself (not proxied): for container health checks."""

from __future__ import annotations

import json

from mitmproxy import ctx, http


class Health:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        # Origin-form (no authority) and addressed to our own listening port: not a proxy
        # request. Requests inside tunnels never get here with our port.
        if request.authority or request.path != "/healthz" or request.method != "GET":
            return
        listening = {address[1] for address in
                     ctx.master.addons.get("proxyserver").listen_addrs()}
        if request.port not in listening or flow.client_conn.tls_established:
            return
        body = json.dumps({"status": "ok"})
        flow.response = http.Response.make(200, body, {"Content-Type": "application/json"})
