"""The trust an intercepted agent needs: what it already trusted, plus the local CA.

Clients read a CA bundle from many variables, and most of them *replace* the system's trust
with the file named: so the bundle holds the user's existing trust (the files the variables
already name, else the system store) and the CA, and the CA alone goes where a variable adds
to the built-in trust (NODE_EXTRA_CA_CERTS). docs/interception.md lists them per tool.
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path

import certifi

from .ca import LocalCA

# Variables naming a bundle that replaces the default trust.
BUNDLE_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                    "PIP_CERT", "NPM_CONFIG_CAFILE", "npm_config_cafile", "CARGO_HTTP_CAINFO",
                    "BUNDLE_SSL_CA_CERT", "DENO_CERT", "AWS_CA_BUNDLE")
EXTRA_VARIABLES = ("NODE_EXTRA_CA_CERTS",)  # added to the built-in trust: the CA alone
BUNDLE_NAME = "trust-bundle.pem"
CA_NAME = "agent-egress-ca.pem"
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)


def existing_trust(environ: Mapping[str, str]) -> list[Path]:
    """The bundles the user's environment already names, else the system store's."""
    named = []
    for variable in BUNDLE_VARIABLES:
        value = environ.get(variable)
        if value and os.path.isfile(value) and Path(value) not in named:
            named.append(Path(value))
    if named:
        return named
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.openssl_cafile, paths.cafile):
        if candidate and os.path.isfile(candidate):
            return [Path(candidate)]
    return [Path(certifi.where())]


def bundle_text(sources: list[Path], ca_pem: bytes) -> bytes:
    """Every certificate of the sources once (a bundle made earlier may be among them), then
    the CA."""
    seen: set[bytes] = set()
    blocks = []
    for source in sources:
        try:
            data = source.read_bytes()
        except OSError:
            continue
        for block in _PEM.findall(data):
            if block not in seen:
                seen.add(block)
                blocks.append(block)
    ca = _PEM.findall(ca_pem)
    blocks += [block for block in ca if block not in seen]
    return b"\n".join(blocks) + b"\n"


def write_trust(ca: LocalCA, directory: Path, environ: Mapping[str, str]) -> tuple[Path, Path]:
    """The bundle and a copy of the CA certificate, readable by any user (the agent may run
    as another uid), written atomically in ``directory``; returns (bundle, ca_certificate)."""
    ca_pem = ca.pem()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    written = []
    for name, data in ((BUNDLE_NAME, bundle_text(existing_trust(environ), ca_pem)),
                       (CA_NAME, ca_pem)):
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, directory / name)
        written.append(directory / name)
    return written[0], written[1]


def ca_environment(bundle: Path, ca_certificate: Path) -> dict[str, str]:
    """The variables pointing every common client at the bundle (and the CA alone where a
    variable adds to the built-in trust)."""
    env = {name: str(bundle) for name in BUNDLE_VARIABLES}
    env.update({name: str(ca_certificate) for name in EXTRA_VARIABLES})
    return env
