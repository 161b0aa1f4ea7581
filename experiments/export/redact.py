"""The redactor every text of an export bundle passes through (issue 10).

It replaces what identifies a person or opens a door with a typed placeholder:

==========================  ==========================================================
``[private-key]``           PEM private key blocks
``[url-with-credentials]``  URLs carrying ``user:password@``
``[bearer-token]``          the token after ``Bearer`` (the word stays)
``[api-key]``               key-shaped strings: ``sk-…``/``sk-ant-…``/``sk-proj-…``,
                            ``AKIA…``/``ASIA…``, ``ghp_…`` and the other GitHub
                            prefixes, ``github_pat_…``, ``xox[abposr]-…`` (Slack),
                            ``AIza…`` (Google), JSON Web Tokens
``[email]``                 e-mail addresses
``[ipv6]`` / ``[ipv4]``     IP addresses (validated by :mod:`ipaddress`)
``[phone]``                 phone numbers written with a leading ``+`` or in the
                            North American ``(555) 123-4567`` / ``555-123-4567`` shapes
``[token]``                 long high-entropy tokens (32+ characters mixing upper and
                            lower case and digits, Shannon entropy >= 4 bits/char)
``[redacted]``              configured extra patterns (``EXPORT_REDACT_PATTERNS``, and
                            ``experiment_export --redact``)
==========================  ==========================================================

What it leaves, on purpose (see tests/data/redaction_corpus.jsonl): version numbers
with more or fewer than four parts (``1.2.3.4.5``), dates and times, UUIDs, lowercase
hex digests (SHA-256, git commit ids), bare digit runs, ``Foo::Bar`` paths, MAC
addresses. A four-part version number that is also a valid IPv4 address
(``1.2.3.4``) is redacted: being wrong that way costs a version number, the other way
an address.

No installed library does this (Presidio, scrubadub and detect-secrets are not
dependencies of the project); the patterns are regular expressions checked by
``ipaddress`` and an entropy estimate, and the corpus pins what they do.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class RedactionPatternError(ValueError):
    """A configured pattern that is not a valid regular expression. Safe to show."""


def _valid_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _valid_ipv6(text: str) -> bool:
    # "a::b" is a valid address but far more often C++ or Rust ("std::io"): an address
    # written in text nearly always carries a digit ("fe80::1", "2001:db8::5").
    if not any(ch.isdigit() for ch in text):
        return False
    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _high_entropy(text: str) -> bool:
    if not (
        any(ch.isupper() for ch in text)
        and any(ch.islower() for ch in text)
        and any(ch.isdigit() for ch in text)
    ):
        return False
    counts = Counter(text)
    entropy = -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
    return entropy >= 4.0


@dataclass(frozen=True)
class Rule:
    kind: str
    pattern: re.Pattern[str]
    placeholder: str
    #: Only matches this accepts are replaced (the whole match's text is passed).
    accept: Any = None
    #: The group replaced (0: the whole match).
    group: int = 0
    #: Substrings one of which every match contains: a text holding none of them skips
    #: the pattern (most prompts hold no "@", "://" or "Bearer").
    hints: tuple[str, ...] = ()


_KEY_BODY = r"[A-Za-z0-9_\-]"

BUILTIN_RULES: tuple[Rule, ...] = (
    Rule(
        "private_key",
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
            re.DOTALL,
        ),
        "[private-key]",
        hints=("PRIVATE KEY",),
    ),
    Rule(
        "url_with_credentials",
        re.compile(
            # Schemes are short: a bounded scheme keeps a long dotted run linear.
            r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{0,31}://[^\s/?#@:\"'<>]+:[^\s/?#@\"'<>]*@"
            # The rest of the URL, less punctuation that ends the sentence around it.
            r"(?:[^\s\"'<>]*[^\s\"'<>.,;:!?)\]}])?"
        ),
        "[url-with-credentials]",
        hints=("://",),
    ),
    Rule(
        "bearer_token",
        re.compile(r"\b[Bb]earer\s+([A-Za-z0-9\-._~+/]{8,}=*)"),
        "[bearer-token]",
        group=1,
        hints=("earer",),
    ),
    Rule(
        "api_key",
        re.compile(
            r"(?<![A-Za-z0-9_\-])(?:"
            rf"sk-(?:ant-|proj-|svcacct-|or-)?{_KEY_BODY}{{16,}}"
            r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
            r"|gh[pousr]_[A-Za-z0-9]{30,}"
            r"|github_pat_[A-Za-z0-9_]{22,}"
            r"|xox[abposr]-[A-Za-z0-9\-]{10,}"
            r"|AIza[0-9A-Za-z_\-]{35}"
            r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"
            r")(?![A-Za-z0-9_\-])"
        ),
        "[api-key]",
        hints=("sk-", "AKIA", "ASIA", "gh", "github_pat_", "xox", "AIza", "eyJ"),
    ),
    Rule(
        "email",
        re.compile(
            r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+"
            r"[A-Za-z]{2,}(?![A-Za-z0-9\-])"
        ),
        "[email]",
        hints=("@",),
    ),
    Rule(
        "ipv6",
        re.compile(
            r"(?<![0-9A-Za-z:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|"
            r"[0-9A-Fa-f]{1,4}|:)?(?:%[0-9A-Za-z]+)?(?![0-9A-Za-z:]|\.\d)"
        ),
        "[ipv6]",
        accept=_valid_ipv6,
        hints=(":",),
    ),
    Rule(
        "ipv4",
        re.compile(r"(?<![0-9A-Za-z.])(?:\d{1,3}\.){3}\d{1,3}(?![0-9A-Za-z]|\.\d)"),
        "[ipv4]",
        accept=_valid_ipv4,
        hints=("0.", "1.", "2.", "3.", "4.", "5.", "6.", "7.", "8.", "9."),
    ),
    Rule(
        "phone",
        re.compile(
            # International: +CC then 6-14 more digits in groups.
            r"(?<![\w+])\+\d{1,3}(?:[ .\-]?\(?\d{1,4}\)?){2,6}(?!\w)"
            # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567.
            r"|(?<![\w.\-])(?:\(\d{3}\)\s?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w]|[.\-]\d)"
        ),
        "[phone]",
        accept=lambda text: 7 <= sum(ch.isdigit() for ch in text) <= 15,
    ),
    Rule(
        "token",
        re.compile(r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{32,}={0,2}(?![A-Za-z0-9+/_\-=])"),
        "[token]",
        accept=_high_entropy,
    ),
)


def compile_extra_patterns(patterns: Iterable[str], *, source: str) -> list[re.Pattern[str]]:
    """Extra patterns as given by staff; a bad one is refused by name (``source`` says
    where it came from: the setting or the option)."""
    compiled = []
    for pattern in patterns:
        if not pattern:
            raise RedactionPatternError(f"An empty redaction pattern in {source} would match all.")
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise RedactionPatternError(
                f"The redaction pattern {pattern!r} in {source} is not a valid regular "
                f"expression: {error}."
            ) from None
        if regex.search(""):
            raise RedactionPatternError(
                f"The redaction pattern {pattern!r} in {source} matches empty text; "
                "it would match everywhere."
            )
        compiled.append(regex)
    return compiled


@dataclass
class Redactor:
    #: Staff-configured patterns, replaced with ``[redacted]`` before the built-in rules.
    extra: list[re.Pattern[str]] = field(default_factory=list)
    #: Literal strings replaced by a placeholder of their own (``{text: placeholder}``):
    #: the export's checkpoint identifiers (upstream model ids and hosts).
    literals: dict[str, str] = field(default_factory=dict)
    #: Replacements made so far, by kind.
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._literal_rules = [
            (
                re.compile(r"(?<![A-Za-z0-9_\-])" + re.escape(text) + r"(?![A-Za-z0-9_\-])"),
                placeholder,
            )
            # Longest first: "rc-1-large" before "rc-1".
            for text, placeholder in sorted(self.literals.items(), key=lambda kv: -len(kv[0]))
            if text
        ]

    def text(self, value: str) -> str:
        for pattern in self.extra:
            value = self._sub(pattern, value, "extra", "[redacted]")
        for rule in BUILTIN_RULES:
            value = self._apply(rule, value)
        for pattern, placeholder in self._literal_rules:
            value = self._sub(pattern, value, "checkpoint_identifier", placeholder)
        return value

    def value(self, value: Any) -> Any:
        """Every string in a JSON value (object keys too), redacted."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {self.text(str(key)): self.value(item) for key, item in value.items()}
        return value

    def _sub(self, pattern: re.Pattern[str], value: str, kind: str, placeholder: str) -> str:
        value, replaced = pattern.subn(placeholder, value)
        if replaced:
            self.counts[kind] += replaced
        return value

    def _apply(self, rule: Rule, value: str) -> str:
        if rule.hints and not any(hint in value for hint in rule.hints):
            return value

        def replace(match: re.Match[str]) -> str:
            if rule.accept is not None and not rule.accept(match.group(0)):
                return match.group(0)
            self.counts[rule.kind] += 1
            if rule.group:
                start, end = match.span(rule.group)
                whole_start = match.start()
                text = match.group(0)
                return text[: start - whole_start] + rule.placeholder + text[end - whole_start :]
            return rule.placeholder

        return rule.pattern.sub(replace, value)


def redact(text: str, *, extra: Iterable[str] = ()) -> str:
    """``text`` redacted with the built-in rules and ``extra`` patterns."""
    return Redactor(extra=compile_extra_patterns(extra, source="the call")).text(text)
