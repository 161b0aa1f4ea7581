"""The export's redactor against its corpus (tests/data/redaction_corpus.jsonl): what it
catches, typed, and the near misses it must leave alone (version numbers, times, UUIDs,
digests, C++ paths, MAC addresses, bare numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.export.redact import (
    BUILTIN_RULES,
    RedactionPatternError,
    Redactor,
    compile_extra_patterns,
    redact,
)

CORPUS = [
    json.loads(line)
    for line in (Path(__file__).parent / "data" / "redaction_corpus.jsonl").read_text().splitlines()
]
PLACEHOLDERS = {rule.kind: rule.placeholder for rule in BUILTIN_RULES}


@pytest.mark.parametrize("case", CORPUS, ids=[f"{c['kind']}:{c['input'][:40]}" for c in CORPUS])
def test_corpus(case):
    redactor = Redactor()
    assert redactor.text(case["input"]) == case["expected"]
    if case["kind"] == "none":
        assert case["expected"] == case["input"]
        assert not redactor.counts
    else:
        assert redactor.counts[case["kind"]] >= 1
        assert PLACEHOLDERS[case["kind"]] in case["expected"]


def test_the_corpus_covers_every_kind_and_its_negatives():
    kinds = {case["kind"] for case in CORPUS}
    assert kinds == {*PLACEHOLDERS, "none"}
    assert sum(case["kind"] == "none" for case in CORPUS) >= 20


def test_extra_patterns_go_first_and_replace_with_redacted():
    extra = compile_extra_patterns([r"ACME-\d+", r"Project Falcon"], source="the test")
    redactor = Redactor(extra=extra)
    text = "Ticket ACME-1234 of Project Falcon, from ops@acme.example"
    assert redactor.text(text) == "Ticket [redacted] of [redacted], from [email]"
    assert redactor.counts == {"extra": 2, "email": 1}


def test_literals_are_replaced_as_whole_tokens_longest_first():
    redactor = Redactor(literals={"rc-1": "[checkpoint]", "rc-1-large": "[checkpoint]"})
    assert redactor.text("rc-1-large beat rc-1, not arc-1 or rc-10") == (
        "[checkpoint] beat [checkpoint], not arc-1 or rc-10"
    )


def test_every_string_of_a_json_value_keys_included_and_nothing_else():
    value = {"to bob@example.com": ["call +44 20 7946 0958", 42, None, {"ip": "10.1.2.3"}]}
    assert Redactor().value(value) == {"to [email]": ["call [phone]", 42, None, {"ip": "[ipv4]"}]}


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (
            "(",
            "The redaction pattern '(' in X is not a valid regular expression: missing ), "
            "unterminated subpattern at position 0.",
        ),
        ("", "An empty redaction pattern in X would match all."),
        ("x?", "The redaction pattern 'x?' in X matches empty text; it would match everywhere."),
    ],
)
def test_bad_extra_patterns_are_refused_by_name(pattern, reason):
    with pytest.raises(RedactionPatternError) as refused:
        compile_extra_patterns([pattern], source="X")
    assert str(refused.value) == reason


def test_redact_shortcut():
    assert (
        redact("mail a@b.example, ping 10.0.0.1", extra=["ping"])
        == "mail [email], [redacted] [ipv4]"
    )
