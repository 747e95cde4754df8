"""Files an agent could have touched: who can change them, and writing them without following
anything it planted.

The agent may run as another uid beside the proxy, or as the same one, in a workspace it owns.
A link it planted where the proxy writes (the audit log, the user policy file) would make the
proxy append to or replace any file the proxy's user can write; a policy file it can rewrite
does not bind it. So paths are checked with lstat and opened with O_NOFOLLOW, and what was
opened is checked with fstat, not the path before opening.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, NamedTuple

DEFAULT_MANAGED_PATH = Path("/etc/agent-egress/managed.toml")


class UnsafePath(Exception):
    """A path the proxy will not write through; the message says which, why, what to do."""


def _ours(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def _open_to_others(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def _check_directory(path: Path, info: os.stat_result, option: str) -> None:
    """Nobody but this proxy's uid and root may rename or replace entries in the directory."""
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(f"{path} is a symbolic link (to {os.readlink(path)}): whoever owns it "
                         f"can point it elsewhere while the proxy runs; use a real directory "
                         f"for {option}")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{path} is not a directory; choose another {option}")
    if not _ours(info.st_uid):
        raise UnsafePath(f"{path} belongs to uid {info.st_uid}, not to this proxy (uid "
                         f"{os.geteuid()}) or root, so its owner could replace what the proxy "
                         f"writes there; choose another {option}")
    if _open_to_others(info.st_mode) and not info.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"{path} is writable by other users (mode "
                         f"{stat.S_IMODE(info.st_mode):04o}), so they could replace what the "
                         f"proxy writes there; choose a private directory for {option}")


def _check_ancestor(path: Path, info: os.stat_result, option: str) -> None:
    """A link above the directory is followed if only we or root could have made it (like
    /var/run -> /run), and then everything it leads through is checked too."""
    if not stat.S_ISLNK(info.st_mode):
        _check_directory(path, info, option)
        return
    if not _ours(info.st_uid):
        raise UnsafePath(f"{path} is a symbolic link owned by uid {info.st_uid}, who can point "
                         f"it elsewhere while the proxy runs; choose another {option}")
    real = Path(os.path.realpath(path))
    for component in (*reversed(real.parents), real):
        _check_directory(component, os.lstat(component), option)


def _make_directory(path: Path, option: str) -> os.stat_result:
    """mkdir 0700, then check (without following links) that what stands there is ours."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:  # made by someone else meanwhile: checked like any existing one
        return os.lstat(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UnsafePath(f"{path} was replaced while it was being created ({exc.strerror}); "
                         f"check who else writes there ({option})") from None
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid():
            os.fchmod(fd, 0o700)  # mkdir's mode is filtered by the umask
            info = os.fstat(fd)
        return info
    finally:
        os.close(fd)


def secure_directory(directory: Path, option: str) -> None:
    """Check every directory down to ``directory``, creating missing ones 0700.

    An existing directory keeps its mode (it may be shared, like /tmp, when the file in it is
    ours and the sticky bit keeps others from replacing it), unless others could replace
    entries in it. ``option`` names the setting to change, for the error message.
    """
    directory = Path(os.path.abspath(directory))
    for component in (*reversed(directory.parents), directory):
        try:
            info = os.lstat(component)
        except FileNotFoundError:
            info = _make_directory(component, option)
        if component == directory:
            _check_directory(component, info, option)
        else:
            _check_ancestor(component, info, option)


def _check_opened(path: Path, fd: int, option: str) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath(f"{path} is not a regular file; choose another {option}")
    if info.st_uid != os.geteuid():
        raise UnsafePath(f"{path} belongs to uid {info.st_uid}, not to this proxy (uid "
                         f"{os.geteuid()}); whoever owns it controls what it says; remove it "
                         f"or choose another {option}")
    if _open_to_others(info.st_mode):
        raise UnsafePath(f"{path} is writable by other users (mode "
                         f"{stat.S_IMODE(info.st_mode):04o}); run 'chmod go-w {path}' or choose "
                         f"another {option}")
    return info


def _open_nofollow(path: Path, flags: int, option: str, mode: int = 0o600) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePath(f"{path} is a symbolic link (to {os.readlink(path)}); the proxy "
                             f"does not write through links; remove it or choose another "
                             f"{option}") from None
        raise UnsafePath(f"cannot open {path}: {exc.strerror}; choose another {option}") from None


def open_append(path: Path, option: str) -> IO[str]:
    """A log file to append to: created 0600 if new, never through a link, ours alone."""
    secure_directory(path.parent, option)
    fd = _open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, option)
    try:
        _check_opened(path, fd, option)
    except UnsafePath:
        os.close(fd)
        raise
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


def read_own_file(path: Path, option: str) -> tuple[str, int]:
    """The text and mode of a file of ours, read without following a link (FileNotFoundError
    when it is missing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePath(f"{path} is a symbolic link (to {os.readlink(path)}); the proxy "
                             f"does not write through links; replace it with the file itself "
                             f"({option})") from None
        raise UnsafePath(f"cannot read {path}: {exc.strerror} ({option})") from None
    with os.fdopen(fd, encoding="utf-8") as handle:
        info = _check_opened(path, handle.fileno(), option)
        return handle.read(), stat.S_IMODE(info.st_mode)


def replace_file(path: Path, text: str, mode: int, option: str) -> None:
    """Write ``text`` to ``path`` atomically (a new file renamed over it) in a checked
    directory; a link at ``path`` is refused, not replaced."""
    secure_directory(path.parent, option)
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise UnsafePath(f"{path} is a symbolic link (to {os.readlink(path)}); the proxy "
                             f"does not write through links ({option})")
    except FileNotFoundError:
        pass
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode & ~0o022)  # never group/other-writable
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# -- who can change a file ---------------------------------------------------------------------

def _members(gid: int) -> set[int]:
    """The uids in a group (its listed members and those whose primary group it is)."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return set()
    uids = set()
    for name in group.gr_mem:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    uids.update(user.pw_uid for user in pwd.getpwall() if user.pw_gid == gid)
    return uids


def _writers(info: os.stat_result) -> str | None:
    """Who beyond the owner may write, from the mode bits; None when nobody."""
    mode = info.st_mode
    if mode & stat.S_IWOTH:
        return "every user"
    if mode & stat.S_IWGRP:
        return f"group {info.st_gid}"
    return None


def change_problems(path: Path, trusted: Iterable[int], *, also: int | None = None) -> list[str]:
    """Why someone other than the ``trusted`` uids could change what ``path`` says: the file
    (its link target), or any directory up to the root, owned by or writable for another uid.
    ``also`` names one more uid that must not be able to (the agent's, when it is known).
    [] when only trusted uids can. A sticky directory (like /tmp) only lets others replace
    what they own, so it counts against the file only through the file's own owner."""
    trusted = set(trusted)
    problems: list[str] = []

    def check(target: Path, what: str) -> None:
        try:
            info = os.lstat(target)
        except OSError:
            return
        if info.st_uid not in trusted:
            problems.append(f"the {what} {target} is owned by uid {info.st_uid}")
        elif also is not None and info.st_uid == also:
            problems.append(f"the {what} {target} is owned by the agent's uid {also}")
        writers = _writers(info)
        sticky_dir = what == "directory" and info.st_mode & stat.S_ISVTX
        if writers and not sticky_dir:
            problems.append(f"the {what} {target} is writable by {writers} (mode "
                            f"{stat.S_IMODE(info.st_mode):04o})")
        elif also is not None and info.st_mode & stat.S_IWGRP and not sticky_dir and (
                also in _members(info.st_gid)):
            problems.append(f"the {what} {target} is writable by the agent's group")

    link = Path(os.path.abspath(path))
    while link.is_symlink():  # every link on the way can be re-pointed by its owner
        check(link, "link")
        link = Path(os.path.abspath(link.parent / os.readlink(link)))
    real = Path(os.path.realpath(path))
    check(real, "file")
    for directory in real.parents:
        check(directory, "directory")
    return problems


class FileTrust(NamedTuple):
    """What the proxy makes of who can change its policy files."""

    refusals: tuple[str, ...] = ()  # the proxy must not run on these files
    warnings: tuple[str, ...] = ()  # it may, but people must be told


def policy_file_trust(user: Path | None, managed: Path | None, *,
                      managed_owners: Iterable[int] = (), agent_uid: int | None = None,
                      protected: bool = False) -> FileTrust:
    """Check the policy files a proxy is about to use.

    The managed file exists to bind the user: if anyone but root (or a named admin uid) can
    change it, the proxy refuses it. The user file is the user's own: if another uid (or the
    agent's) can change it, that is said wherever people look, and refused when the managed
    policy says `requirements.protected_file = true`.
    """
    refusals: list[str] = []
    warnings: list[str] = []
    if managed is not None and (problems := change_problems(
            managed, {0, *managed_owners}, also=agent_uid)):
        refusals.append(f"the managed policy {managed} can be changed by others than root"
                        f"{' and the admin uid' if managed_owners else ''}, so it would not "
                        f"bind them: {'; '.join(problems)}. Make the file and every directory "
                        "above it root-owned and not group/other-writable.")
    if user is not None and (problems := change_problems(
            user, {os.geteuid(), 0}, also=agent_uid)):
        message = (f"the user policy {user} can be changed by another user"
                   f"{' or the agent' if agent_uid is not None else ''}: {'; '.join(problems)}")
        if protected:
            refusals.append(f"{message}. Refusing it (requirements.protected_file = true): "
                            "make it writable by the proxy's user only.")
        else:
            warnings.append(message)
    return FileTrust(tuple(refusals), tuple(warnings))


def files_signature(paths: Iterable[str | None]) -> tuple[Any, ...]:
    """Which versions of these files exist now (inode, mtime, size): a change of any is a new
    version. Empty paths are skipped; a missing file is its own version."""
    signature: list[Any] = []
    for path in paths:
        if not path:
            continue
        try:
            info = os.stat(path)
            signature.append((path, info.st_ino, info.st_mtime_ns, info.st_size))
        except OSError:
            signature.append((path, None))
    return tuple(signature)
