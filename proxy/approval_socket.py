"""Where the approval socket lives: a path nobody else can plant, take over, or remove.

Whoever controls the socket's path controls who approvers talk to, so every path is checked with
lstat and never followed: a link, or a directory another user owns, could send the socket (or
its removal at stop) somewhere the proxy did not mean. A socket a live proxy answers on is never
taken over, only one that refuses connections (left by a crash) is replaced; at stop the proxy
removes the socket only while the path still is the one it bound.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import stat
from pathlib import Path

from agent_egress.policy.files import UnsafePath, secure_directory

PROBE_TIMEOUT = 2.0

Identity = tuple[int, int]  # (st_dev, st_ino): which file the path names


class SocketSetupError(Exception):
    """The socket cannot be created safely; the message says which path, why, what to do."""


class SocketInUseError(SocketSetupError):
    """A proxy (or something else) answers on the socket: it is not ours to replace."""


def _identity(info: os.stat_result) -> Identity:
    return info.st_dev, info.st_ino


def prepare_directory(directory: Path) -> None:
    """Check every directory down to the socket's, creating the missing ones 0700 (see
    policy.files.secure_directory: the rules the audit log and policy writes follow too)."""
    try:
        secure_directory(directory, "--approval-socket")
    except UnsafePath as exc:
        raise SocketSetupError(str(exc)) from None


async def _listen_addresses(reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> list[str]:
    """What the proxy on the socket says it listens on (its owner may be anyone: only short
    printable strings are repeated)."""
    writer.write(b'{"v": 1, "op": "status"}\n')
    reply = json.loads(await reader.readline())
    return [address for address in reply["status"]["listen"][:4]
            if isinstance(address, str) and address.isprintable() and len(address) <= 64]


async def _refuse_if_answered(path: Path, owner: int) -> None:
    """Raise unless connecting is refused: only then is nobody behind the socket."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)),
                                                PROBE_TIMEOUT)
    except (ConnectionRefusedError, FileNotFoundError):  # stale, or gone meanwhile
        return
    except PermissionError:
        raise SocketSetupError(
            f"{path} is a socket of uid {owner} that this proxy may not connect to, so it cannot "
            "tell whether a proxy answers there; stop that proxy or remove the socket (as its "
            "owner or root), or choose another --approval-socket") from None
    except (OSError, TimeoutError) as exc:
        raise SocketInUseError(
            f"{path}: cannot tell whether a proxy answers there ({exc or 'no answer'}); stop it "
            "or remove the socket, or choose another --approval-socket") from None
    try:
        listen = await asyncio.wait_for(_listen_addresses(reader, writer), PROBE_TIMEOUT)
    except (OSError, TimeoutError, ValueError, KeyError, TypeError):
        listen = []  # not a proxy that answers `status` to us; still, something answers
    finally:
        writer.close()
    whose = f" of uid {owner}" if owner != os.geteuid() else ""
    where = f" (listening on {', '.join(listen)})" if listen else ""
    raise SocketInUseError(
        f"{path}: a proxy{whose} already answers there{where}; stop it first, or start this "
        "proxy with another --approval-socket")


async def clear_stale_socket(path: Path) -> None:
    """Make room at `path`: remove a stale socket of ours; refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise SocketSetupError(
            f"{path} is a symbolic link (to {os.readlink(path)}), not a socket: a link could "
            "send approvers elsewhere; remove it, or choose another --approval-socket")
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketSetupError(f"{path} exists and is not a socket; remove it or choose "
                               "another --approval-socket")
    await _refuse_if_answered(path, info.st_uid)
    try:
        current = os.lstat(path)
    except FileNotFoundError:
        return
    if _identity(current) != _identity(info):
        raise SocketInUseError(f"{path} was replaced while this proxy checked it: is another "
                               "proxy starting there? Choose another --approval-socket")
    if info.st_uid != os.geteuid():
        raise SocketSetupError(
            f"{path} is a stale socket of uid {info.st_uid}; remove it (as that user or root), "
            "or choose another --approval-socket")
    os.unlink(path)


def bind_socket(path: Path) -> tuple[socket.socket, Identity]:
    """Bind a new socket 0600 (bind never follows or replaces what stands at the path)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise SocketSetupError(f"cannot create {path}: {exc}") from None
        raise SocketSetupError(f"cannot create {path}: something else appeared there while the "
                               "proxy started; check who else writes there") from None
    finally:
        os.umask(old_umask)
    info = os.lstat(path)
    problem = None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
        problem = "is not the socket this proxy just created"
    elif stat.S_IMODE(info.st_mode) & 0o077:
        problem = (f"was created with mode {stat.S_IMODE(info.st_mode):04o}, open to other "
                   "users (a default ACL on the directory?)")
        os.unlink(path)  # ours, but not safe to keep
    if problem is not None:
        sock.close()
        raise SocketSetupError(f"{path} {problem}; choose a private directory for "
                               "--approval-socket")
    return sock, _identity(info)


def release_socket(path: Path, identity: Identity) -> bool:
    """Remove the socket if the path still names the one we bound; False if it names another
    file (which is left alone)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return True
    if not stat.S_ISSOCK(info.st_mode) or _identity(info) != identity:
        return False
    os.unlink(path)
    return True
