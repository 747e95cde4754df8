"""Typed errors of the policy engine, with messages a user can act on."""

from __future__ import annotations

from dataclasses import dataclass, field


class InvalidHost(ValueError):
    """A host name or address that cannot be normalised (and so is never allowed)."""


class InvalidPattern(ValueError):
    """A rule pattern that is not one of the documented forms."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a policy file: where, which key, what, and what would be valid."""

    message: str
    key: str = ""
    line: int | None = None

    def render(self, path: str) -> str:
        where = f"{path}:{self.line}" if self.line else path
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


@dataclass
class PolicyError(Exception):
    """A policy file that cannot be used. It is never half-loaded."""

    path: str
    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [p.render(self.path) for p in self.problems]
        count = len(self.problems)
        head = f"policy {self.path} is invalid ({count} problem{'s' if count != 1 else ''}):"
        return "\n".join([head, *("  " + line for line in lines)])
