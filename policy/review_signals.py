"""What a host name gives away, as pure functions: its registrable domain, random-looking or
overlong labels, and spellings made to pass for another name.

The rules reviewer (policy/review.py) turns these into signals; each one is cheap (one pass
over a label), so a review stays well under a millisecond.
"""

from __future__ import annotations

import math
import tomllib
import unicodedata
from collections import Counter
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import Any

import idna

LONG_LABEL = 40  # characters: DNS-tunnel payload labels run to the 63 allowed
LONG_NAME = 100
_VOWELS = frozenset("aeiouy")
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyz")


@cache
def review_data() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("review.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


@cache
def _extractor() -> Any:
    import tldextract  # only when auto-review is on: its suffix list costs a few MiB

    # The bundled Public Suffix List, private section included: "x.github.io" and
    # "b.s3.amazonaws.com" are registrable domains of their own, not github.io's or amazon's.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None,
                                 include_psl_private_domains=True)


def registrable_domain(host: str) -> str:
    """The name its owner registered ("pypi.org" for "files.pypi.org"); the host itself when
    it has no public suffix (a single label, ".test", ".internal")."""
    parts = _extractor()(host)
    if not parts.suffix or not parts.domain:
        return host
    return f"{parts.domain}.{parts.suffix}"


def owner_label(host: str) -> str:
    """The registered label alone ("pypi" for "files.pypi.org")."""
    return registrable_domain(host).split(".", 1)[0]


def entropy(label: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(label)
    size = len(label)
    return -sum(n / size * math.log2(n / size) for n in counts.values())


def random_looking(label: str) -> bool:
    """A label that reads like encoded data or a generated name rather than words: hex or
    base32/64 payloads, letter-digit soup, long consonant runs."""
    if len(label) < 12 or label.startswith("xn--"):
        return False
    text = label.replace("-", "").replace("_", "")
    letters = [c for c in text if c in _LETTERS]
    digits = sum(c.isdigit() for c in text)
    if len(text) >= 16 and all(c in "0123456789abcdef" for c in text) and digits >= 3:
        return True  # hex
    if len(text) >= 12 and digits >= 3 and letters and _switches(text) >= 6:
        return True  # letters and digits interleaved: "a8f3k2m9q7x1"
    vowels = sum(c in _VOWELS for c in letters)
    if len(letters) >= 12 and vowels / len(letters) < 0.2:
        return True
    return len(text) >= 16 and entropy(text) >= 3.9


def generated_looking(label: str) -> bool:
    """A registered label with the shape of a domain-generation algorithm's output: no words
    in it, nothing pronounceable."""
    if len(label) < 8 or label.startswith("xn--") or "-" in label:
        return False
    letters = [c for c in label if c in _LETTERS]
    if not letters:
        return False
    vowels = sum(c in _VOWELS for c in letters)
    return vowels / len(letters) < 0.25 or _consonant_run(label) >= 5 or (
        any(c.isdigit() for c in label) and _switches(label) >= 4)


def _switches(text: str) -> int:
    return sum(a.isdigit() != b.isdigit() for a, b in zip(text, text[1:], strict=False))


def _consonant_run(label: str) -> int:
    longest = run = 0
    for char in label:
        run = run + 1 if char in _LETTERS and char not in _VOWELS else 0
        longest = max(longest, run)
    return longest


@cache
def _confusables() -> dict[int, str]:
    pairs = review_data()["lookalike"]["confusables"].split()
    return {ord(pairs[i]): pairs[i + 1] for i in range(0, len(pairs), 2)}


def skeleton(host: str) -> str | None:
    """The ASCII a Unicode (punycode) name passes for, or None for a plain ASCII name or one
    that does not fold to ASCII."""
    if "xn--" not in host:
        return None
    try:
        text = idna.decode(host)
    except idna.IDNAError:
        try:
            text = host.encode().decode("idna")
        except UnicodeError:
            return None
    folded = unicodedata.normalize("NFKD", text.translate(_confusables()))
    plain = "".join(c for c in folded if not unicodedata.combining(c))
    plain = plain.translate(_confusables())
    return plain if plain.isascii() else None


def mixed_scripts(host: str) -> bool:
    """A label mixing Latin letters with Cyrillic, Greek or Armenian ones: a spelling meant
    to deceive (a genuine IDN keeps to one script per label)."""
    if "xn--" not in host:
        return False
    try:
        labels = idna.decode(host).split(".")
    except idna.IDNAError:
        return True  # not even valid IDNA: no honest name looks like that
    for label in labels:
        scripts = {unicodedata.name(c, "?").split(" ", 1)[0] for c in label if c.isalpha()}
        if "LATIN" in scripts and scripts & {"CYRILLIC", "GREEK", "ARMENIAN"}:
            return True
    return False


def one_edit_apart(a: str, b: str) -> bool:
    """Exactly one insertion, deletion, substitution or swap of neighbours turns a into b."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = 0
    while i < len(short) and short[i] == long[i]:
        i += 1
    return short[i:] == long[i + 1:]


class KnownLabels:
    """Registered labels worth imitating, indexed by their one-letter deletions so "one edit
    away" is a few dictionary lookups, not a scan (symmetric-delete lookup)."""

    def __init__(self, labels: Iterable[str], indexed: Iterable[str] | None = None) -> None:
        """``indexed``: the labels looked up one edit away (default: all of them); a huge
        allowlist indexes only its best-known names, as the index costs ~1 KiB a label."""
        self.labels = frozenset(labels)
        self._indexed = frozenset(label for label in (
            self.labels if indexed is None else indexed) if len(label) >= 5)
        self._by_deletion: dict[str, set[str]] = {}
        for label in self._indexed:
            for variant in _deletions(label):
                self._by_deletion.setdefault(variant, set()).add(label)

    def __contains__(self, label: object) -> bool:
        return label in self.labels

    def one_edit_from(self, label: str) -> str | None:
        found = set(self._by_deletion.get(label, ()))  # a letter added to a known label
        for variant in _deletions(label):
            if variant in self._indexed:
                found.add(variant)  # a letter dropped
            found.update(self._by_deletion.get(variant, ()))  # changed, or two swapped
        return min((name for name in found if one_edit_apart(label, name)), default=None)


def _deletions(label: str) -> set[str]:
    return {label[:i] + label[i + 1:] for i in range(len(label))}


def imitated(label: str, known: KnownLabels) -> str | None:
    """The known registered label this one imitates: one edit away ("githuh"), or the known
    label with words hyphenated on ("pypi-mirror", "login-github")."""
    if label in known or len(label) < 4 or label.startswith("xn--"):
        return None  # an IDN is compared by its skeleton instead
    for word in label.split("-"):
        if word != label and word in known and len(word) >= 4:
            return word
    return known.one_edit_from(label)
