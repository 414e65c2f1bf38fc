"""Build the labeled detection corpus: ``dev.jsonl`` and ``holdout.jsonl``.

Run from the repository root::

    python tests/data/detection/generate.py          # rewrite both files
    python tests/data/detection/generate.py --check  # fail if they are stale

Each line is ``{"id": ..., "payload": <json>, "findings": [{"path", "category"}]}``
with *every* finding the specification (``PII_DETECTION.md``) asks for, no more.

Labels never come from the detector.  A payload is written with :class:`T`
markers on the leaves that hold PII (``T("call (212) 555-0147", "phone")``);
:func:`resolve` replaces each marker by its text and records ``(path,
category)``.  Leaves that are plain strings are labeled "no PII", so every
filler value here was chosen to be clean under the specification (no
nine-digit ids, no dotted quads, no ``x@y.zz``).  The only library consulted
for a label is ``phonenumbers`` (the oracle the specification names for
international numbers), and only to check that the numbers picked as
positives are valid.

Two splits, two generation approaches:

* ``holdout`` (written first, before the detector existed, and not looked at
  while tuning): Celery-message-shaped payloads (``task``/``id``/``args``/
  ``kwargs``) from six business scenarios with slots filled at random from
  the holdout value pools, plus hand-written payloads.
* ``dev`` (what the detector was tuned on): flat ``kwargs``-style payloads,
  per-category batteries of positives and hard negatives, sentence and log
  templates of its own, other value pools, plus hand-written payloads.

All data is fake: test card numbers, made-up SSNs, example.* domains,
555-01xx and drama/fiction phone ranges, documentation IP ranges and
invented keys.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from celery_pii._paths import format_path  # noqa: E402

# --------------------------------------------------------------------------
# Labeling machinery
# --------------------------------------------------------------------------


class T:
    """A string leaf that holds PII of the given categories."""

    __slots__ = ("cats", "text")

    def __init__(self, text: str, *cats: str) -> None:
        self.text = text
        self.cats = frozenset(cats)

    def __add__(self, other: object) -> T:
        return join(self, other)

    def __radd__(self, other: object) -> T:
        return join(other, self)


def join(*pieces: object, sep: str = "") -> T:
    """Concatenate plain strings and :class:`T` pieces, uniting categories."""
    texts: list[str] = []
    cats: set[str] = set()
    for piece in pieces:
        if isinstance(piece, T):
            texts.append(piece.text)
            cats |= piece.cats
        else:
            texts.append(str(piece))
    return T(sep.join(texts), *cats)


def fmt(template: str, **slots: object) -> T:
    """``str.format`` for templates whose slots may be :class:`T` values.

    Only the slots the template uses lend their categories.
    """
    used = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    cats: set[str] = set()
    plain: dict[str, str] = {}
    for name, value in slots.items():
        if isinstance(value, T):
            if name in used:
                cats |= value.cats
            plain[name] = value.text
        else:
            plain[name] = str(value)
    return T(template.format(**plain), *cats)


def as_json_text(value: Any, **kwargs: Any) -> T:
    """JSON-in-a-string: the categories inside travel to the one leaf."""
    cats: set[str] = set()

    def strip(node: Any) -> Any:
        if isinstance(node, T):
            cats.update(node.cats)
            return node.text
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    kwargs.setdefault("ensure_ascii", False)
    return T(json.dumps(strip(value), **kwargs), *cats)


def resolve(payload: Any) -> tuple[Any, list[dict[str, str]]]:
    """Replace markers by text; return the payload and its sorted findings."""
    findings: set[tuple[str, str]] = set()

    def walk(node: Any, parts: tuple[str | int, ...]) -> Any:
        if isinstance(node, T):
            findings.update((format_path(parts), cat) for cat in node.cats)
            return node.text
        if isinstance(node, dict):
            return {k: walk(v, (*parts, k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, (*parts, i)) for i, v in enumerate(node)]
        return node

    clean = walk(payload, ())
    return clean, [{"path": p, "category": c} for p, c in sorted(findings)]


def record(rid: str, payload: Any) -> dict[str, Any]:
    """One corpus line."""
    clean, findings = resolve(payload)
    return {"id": rid, "payload": clean, "findings": findings}


# --------------------------------------------------------------------------
# Reference checks used to keep labels honest (independent of the detector)
# --------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_complete(prefix: str, length: int) -> str:
    """``prefix`` padded with zeros and a Luhn check digit (obviously fake)."""
    body = prefix.ljust(length - 1, "0")
    for check in "0123456789":
        if luhn_ok(body + check):
            return body + check
    raise AssertionError(prefix)  # pragma: no cover


def card_brand_ok(digits: str) -> bool:
    """Brand prefix and length as the specification lists them."""
    n = len(digits)
    if n == 15:
        return digits[:2] in ("34", "37")
    if n != 16:
        return False
    two, three, four = int(digits[:2]), int(digits[:3]), int(digits[:4])
    return (
        digits[0] == "4"
        or 51 <= two <= 55
        or 2221 <= four <= 2720
        or four == 6011
        or 644 <= three <= 649
        or two == 65
    )


def card_ok(digits: str) -> bool:
    """A card under the specification."""
    return card_brand_ok(digits) and luhn_ok(digits)


def ssn_ok(area: int, group: int, serial: int) -> bool:
    """SSA validity rules of the specification."""
    return area not in (0, 666) and area < 900 and group != 0 and serial != 0


def phone_ok(text: str) -> bool:
    """International positives must be valid numbers (the spec's oracle)."""
    import phonenumbers

    return bool(phonenumbers.is_valid_number(phonenumbers.parse(text, None)))


KEY_FORMS = [
    re.compile(p)
    for p in (
        r"(AKIA|ASIA)[A-Z0-9]{16}",
        r"gh[pousr]_[A-Za-z0-9]{36}",
        r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}",
        r"xox[bp](-[0-9]+)+-[A-Za-z0-9]{24,32}",
        r"[sr]k_live_[A-Za-z0-9]{24,}",
        r"AIza[A-Za-z0-9_-]{35}",
    )
]


def key_ok(text: str) -> bool:
    """An API key by format, as the specification lists them."""
    return any(form.fullmatch(text) for form in KEY_FORMS)


def aws_secret_ok(text: str) -> bool:
    """40 characters of [A-Za-z0-9/+] with upper, lower and digit."""
    return bool(
        re.fullmatch(r"[A-Za-z0-9/+]{40}", text)
        and re.search("[A-Z]", text)
        and re.search("[a-z]", text)
        and re.search("[0-9]", text)
    )


def card_formats(digits: str) -> list[str]:
    """Contiguous, spaced and dashed renderings."""
    if len(digits) == 15:
        groups = [digits[:4], digits[4:10], digits[10:]]
    else:
        groups = [digits[i : i + 4] for i in range(0, 16, 4)]
    return [digits, " ".join(groups), "-".join(groups)]


# ==========================================================================
# HOLDOUT (approach B).  Written before the detector; do not tune on it.
# ==========================================================================

H_SEED = 20240611

H_CARDS = [
    "4242424242424242",
    "4000056655665556",
    "5555555555554444",
    "2223003122003222",
    "371449635398431",
    "6011000990139424",
    "6011981111111113",
    "4000002500003155",
    "5200828282828210",
    "378734493671000",
    "6445644564456445",
    "4988438843884305",
    "5555341244441115",
    luhn_complete("6520", 16),
    luhn_complete("2700", 16),
    luhn_complete("6470", 16),
]
# Luhn-valid but brandless (Diners, JCB, UnionPay, Maestro), Luhn failures,
# barcodes, snowflakes, timestamps, tracking numbers, IBANs, masks, tokens.
H_CARD_NEG = [
    "3056930009020004",
    "3566002020360505",
    "6200000000000005",
    "6759649826438453",
    "4242424242424241",
    "5555555555554445",
    "3714 496353 98432",
    "4000 0566 5566 5557",
    "1158348796553265152",
    "175928847299117063",
    "1718035231123456",
    "1700000000000",
    "9400 1000 0000 0000 0000 00",
    "9205500000000000000000",
    "1Z999AA10123456784",
    "DE89 3704 0044 0532 0130 00",
    "GB82 WEST 1234 5698 7654 32",
    "NL91ABNA0417164300",
    "**** **** **** 4242",
    "XXXX-XXXX-XXXX-5556",
    "424242******4242",
    "pm_1OqXhK2eZvKYlo2CfUu3Hk1a",
    "tok_visa",
    "tok_mastercard_debit",
    "card_1N3T00LkdIwHu7ixRdxpVI1Q",
    "4242.4242.4242.4242",
    "5901234123457",
    "00012345600012",
]

H_SSN_NEG = [
    "000-45-6789",
    "666-45-6789",
    "912-45-6789",
    "734-00-1234",
    "529-34-0000",
    "000456789",
    "666456789",
    "987654320",
    "10001-0001",
    "94107-2031",
    "12-3456789",
    "45-0987654",
    "***-**-6789",
    "XXX-XX-4321",
    "xxx-xx-xxxx",
]

H_EMAIL_LOCALS = [
    "m.rossi",
    "anna-lena",
    "o'connor.k",
    "zoë",
    "jürgen.müller",
    "user+billing",
    "first_last",
    "x.y.z",
    "李雷",
    "a1b2c3",
    "noreply",
    "ops-team",
    "k.tanaka",
    "dpo",
]
H_EMAIL_DOMAINS = [
    "example.net",
    "mail.example.org",
    "eu.example.com",
    "例子.测试",
    "example.xn--0zwm56d",
    "bücher.example.com",
    "support.example.net",
]
H_EMAIL_NEG = [
    "user@",
    "@example.net",
    "a@b",
    "admin@localhost",
    "k..tanaka@example.net",
    ".dpo@example.org",
    "dpo.@example.org",
    "lodash@4.17.21",
    "@babel/core@7.18.1",
    "react-dom@^18.2.0",
    "@shared_task",
    "@app.task(bind=True)",
    "@tanaka",
    "m***@example.net",
    "an***-le**@exa****.org",
    "m dot rossi at example dot net",
    "ops[at]example[dot]org",
    "user@example.c",
    "user@exa_mple.com",
]

H_US_AREAS = ["212", "312", "646", "718", "303", "617", "206", "512"]
H_INTL = [
    "+44 20 7946 0018",
    "+44 113 496 0000",
    "+61 2 5550 1234",
    "+33 1 99 00 12 34",
    "+81 3-1234-5678",
    "+91 98765 43210",
    "+49 30 12345678",
    "+34 912 345 678",
    "+46 8 123 456 78",
    "+44 (0)161 496 0123",
    "+4420 7946 0958",
    "+441134960000",
    "+353 1 234 5678",
    "+7 495 123-45-67",
]
H_PHONE_NEG = [
    "4155550147",
    "qty 2,500",
    "ACCT 00123456789",
    "978-3-16-148410-0",
    "0-306-40615-2",
    "94107-2031",
    "2024-03-11",
    "11.03.2024",
    "1710150902",
    "$1,204,332.10",
    "EUR 12.345,67",
    "(***) ***-0147",
    "+1 (***) ***-**47",
    "(123) 456-7890",
    "911-555-0147",
    "212-111-0147",
    "212-055-0147",
    "+1 123 456 7890",
    "+999 1234 5678",
    "+44 20 1234",
    "12555550147",
]

H_IPS = [
    "192.0.2.44",
    "198.51.100.7",
    "203.0.113.250",
    "10.12.0.5",
    "172.16.254.1",
    "127.0.0.1",
    "255.255.255.0",
    "0.0.0.0",  # noqa: S104 - a value to detect, not a bind address
    "2001:db8::8a2e:370:7334",
    "2001:db8:0:0:1:0:0:1",
    "::1",
    "fe80::1ff:fe23:4567:890a",
    "::ffff:192.0.2.128",
    "2001:DB8:85A3::8A2E:370:7334",
]
H_IP_NEG = [
    "1.2.3",
    "v1.2.3.4",
    "6.1.7601.24546",
    "10.0.19045.3803",
    "1.2.3.4.5",
    "1.3.6.1.4.1.311.21.8",
    "00:1A:2B:3C:4D:5E",
    "3c-22-fb-01-9a-7e",
    "10:30:00",
    "23:59:59.999",
    "[11/Mar/2024:08:15:02 +0000]",
    "std::vector<int>",
    "boost::asio::ip::tcp",
    "37.7749,-122.4194",
    "(51.5074, -0.1278)",
    "203.0.x.x",
    "192.168.*.*",
    "256.10.0.1",
    "192.168.001.010",
    "ip-10-0-1-23.ec2.internal",
    "10.0.0.1-rc2",
]

H_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYHOLDOUTKEY"
H_SECRET2 = "Zq8xT2mLk9PfR4vBn7Wc3Hj6Ys1Ud5Ea0GoHOLD4"
H_KEYS = [
    "AKIAJ7Q3HOLDOUTEXAMP",
    "ASIAZ4K2HOLDOUT9FAKE",
    "ghp_Hq2Lx9Tb4Vn7Rk1Mw3Zp8Yc5Jd6Fs0Ga2Ke9",
    "gho_7Yt2Qw9Er4Ty1Ui6Op3As8Df5Gh0Jk2Lz7Xc",
    "ghs_Mn3Bv8Cx1Za6Sd9Fg2Hj5Kl0Qw7Er4Ty1Ui3",
    "github_pat_11ABCDEFG0HoldoutFake1_Qw8Er2Ty6Ui4Op9As1Df5Gh3Jk7Lz0Xc2Vb8Nm4Qw6Er1Ty9Ui3Op5As7Df",
    "xoxb-2048117365-5125370986123-Hq2Lx9Tb4Vn7Rk1Mw3Zp8Yc5",
    "xoxp-1204-8872-30412-6f3a9c2e7b1d4f8a0c5e9b2d7f1a3c6e",
    "sk_live_51HoldoutFakeKeyQw8Er2Ty6Ui4Op9As",
    "rk_live_51HoldoutFakeRestrictedKey7Lz0Xc2",
    "AIzaSyHoldout-FakeKey_Qw8Er2Ty6Ui4Op9As",
]
H_PEM = [
    "-----BEGIN RSA PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----",
    "-----BEGIN EC PRIVATE KEY-----",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
    "-----BEGIN ENCRYPTED PRIVATE KEY-----",
]
H_KEY_NEG = [
    "da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "SGVsbG8sIFdvcmxkISBUaGlzIGlzIGEgYmFzZTY0IGJsb2IgZm9yIHRlc3Rz",
    "c2d4f1e0-8a7b-4c3d-9e2f-1a0b9c8d7e6f",
    "pk_live_51HoldoutPublishableQw8Er2Ty6Ui4",
    "sk_test_51HoldoutTestModeKeyQw8Er2Ty6Ui4",
    "ghp_XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
    "<YOUR_GITHUB_TOKEN>",
    "AKIA****************",
    "AKIAXXXXXXXXXXXXXXXX",
    "${STRIPE_SECRET_KEY}",
    "changeme",
    "xoxb-your-bot-token",
    "-----BEGIN PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----",
    "-----BEGIN RSA PUBLIC KEY-----",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHoldoutFakePublicKeyQw8Er2Ty6Ui4 ci@example",
    H_SECRET,  # an AWS-secret-shaped value with no context is not a secret
]

H_NAMES = ["Maria Rossi", "Kenji Tanaka", "Anna-Lena Vogel", "Ola Nordmann", "Priya Nair"]
H_CITIES = ["Lyon", "Osaka", "Leeds", "Austin", "Porto"]


def _h_card(rng: random.Random) -> T:
    return T(rng.choice(card_formats(rng.choice(H_CARDS))), "credit_card")


def _h_ssn(rng: random.Random) -> T:
    while True:
        area, group, serial = rng.randint(1, 899), rng.randint(1, 99), rng.randint(1, 9999)
        if ssn_ok(area, group, serial):
            break
    if rng.random() < 0.7:
        return T(f"{area:03d}-{group:02d}-{serial:04d}", "ssn")
    return T(f"{area:03d}{group:02d}{serial:04d}", "ssn")


def _h_email(rng: random.Random) -> T:
    return T(f"{rng.choice(H_EMAIL_LOCALS)}@{rng.choice(H_EMAIL_DOMAINS)}", "email")


def _h_phone(rng: random.Random) -> T:
    if rng.random() < 0.45:
        text = rng.choice(H_INTL)
        assert phone_ok(text), text
        return T(text, "phone")
    area, line = rng.choice(H_US_AREAS), f"01{rng.randint(0, 99):02d}"
    forms = [
        f"({area}) 555-{line}",
        f"{area}.555.{line}",
        f"+1-{area}-555-{line}",
        f"1 ({area}) 555-{line}",
        f"+1{area}555{line}",
        f"{area}-555-{line} ext. {rng.randint(2, 999)}",
        f"+1 {area} 555 {line}",
        f"({area})555-{line}",
    ]
    return T(rng.choice(forms), "phone")


def _h_ip(rng: random.Random) -> T:
    ip = rng.choice(H_IPS)
    roll = rng.random()
    if ":" not in ip and roll < 0.2:
        ip += f":{rng.choice([22, 443, 5432, 8080])}"
    elif ":" not in ip and roll < 0.3:
        ip += "/24"
    elif ":" in ip and roll < 0.15:
        ip = f"[{ip}]:443"
    return T(ip, "ip_address")


def _h_key(rng: random.Random) -> T:
    if rng.random() < 0.2:
        return T(rng.choice(H_PEM) + "\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC...\n", "api_key")
    return T(rng.choice(H_KEYS), "api_key")


H_POSITIVE: dict[str, Callable[[random.Random], T]] = {
    "credit_card": _h_card,
    "ssn": _h_ssn,
    "email": _h_email,
    "phone": _h_phone,
    "ip_address": _h_ip,
    "api_key": _h_key,
}
H_NEGATIVE = {
    "credit_card": H_CARD_NEG,
    "ssn": H_SSN_NEG,
    "email": H_EMAIL_NEG,
    "phone": H_PHONE_NEG,
    "ip_address": H_IP_NEG,
    "api_key": H_KEY_NEG,
}


def _h_any(rng: random.Random, pii_rate: float = 0.5) -> T | str:
    """A value of a random category: PII or one of its hard negatives."""
    cat = rng.choice(list(H_POSITIVE))
    if rng.random() < pii_rate:
        return H_POSITIVE[cat](rng)
    return rng.choice(H_NEGATIVE[cat])


def _h_maybe(rng: random.Random, cat: str, rate: float = 0.5) -> T | str:
    if rng.random() < rate:
        return H_POSITIVE[cat](rng)
    return rng.choice(H_NEGATIVE[cat])


def _h_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


H_SENTENCES = [
    "Customer {name} called from {a} regarding invoice INV-2024-{n}.",
    "Ticket escalated: {a}. Customer in {city} says it happened twice.",
    "Note from agent: caller read out {a} and asked us to double-check {b}.",
    "Hi team, the user wrote '{a}' in the comments field, please review.",
    "{a} — flagged by the fraud rule R{n}, see dashboard.",
    "Re: your request #{n}\n> {a}\n> {b}\nThanks, {name}",
    "Forwarding the details: {a}; {b}.",
    "Update {n}: value was {a} (previously {b})",
]
H_LOGS = [
    "2024-03-11T08:15:02.113Z WARN payment.gateway declined ref={a} attempt={n}",
    '[11/Mar/2024:08:15:02 +0000] "POST /api/v2/checkout HTTP/1.1" 402 {n} "{a}"',
    "INFO worker-{n} task shop.sync_contact[{id}] payload_field={a}",
    'level=error msg="upstream failure" detail="{a}" retry={n}',
    "Mar 11 08:15:02 web-{n} sshd[2211]: note {a}",
    "2024-03-11 08:15:02,113 celery.app.trace ERROR {a} raised ValueError",
]


def _h_sentence(rng: random.Random) -> T:
    return fmt(
        rng.choice(H_SENTENCES),
        a=_h_any(rng, 0.6),
        b=_h_any(rng, 0.4),
        name=rng.choice(H_NAMES),
        city=rng.choice(H_CITIES),
        n=rng.randint(2, 4999),
    )


def _h_log(rng: random.Random) -> T:
    return fmt(rng.choice(H_LOGS), a=_h_any(rng, 0.6), n=rng.randint(2, 999), id=_h_id(rng))


def _h_scenario_order(rng: random.Random) -> dict[str, Any]:
    items = [
        {
            "sku": f"SKU-{rng.randint(1000, 9999)}-{rng.choice('ABC')}",
            "qty": rng.randint(1, 5),
            "price": "19.90",
        }
        for _ in range(rng.randint(1, 4))
    ]
    customer: dict[str, Any] = {"name": rng.choice(H_NAMES), "tier": rng.choice(["gold", "basic"])}
    if rng.random() < 0.8:
        customer["email"] = _h_maybe(rng, "email", 0.8)
    if rng.random() < 0.6:
        customer["phone"] = _h_maybe(rng, "phone", 0.7)
    payment: dict[str, Any] = {
        "method": "card",
        "token": rng.choice(["tok_visa", "pm_card_visa", "pm_1Hx2Ab"]),
    }
    payment["card"] = _h_maybe(rng, "credit_card", 0.6)
    return {
        "args": [f"ord_{rng.getrandbits(40):010x}"],
        "kwargs": {
            "order": {
                "items": items,
                "customer": customer,
                "payment": payment,
                "shipping": {
                    "city": rng.choice(H_CITIES),
                    "tracking": rng.choice(["1Z999AA10123456784", "9400 1000 0000 0000 0000 00", None]),
                },
            },
            "notes": [_h_sentence(rng) for _ in range(rng.randint(0, 2))],
        },
    }


def _h_scenario_ticket(rng: random.Random) -> dict[str, Any]:
    return {
        "args": [],
        "kwargs": {
            "ticket": {
                "subject": rng.choice(["Billing question", "Cannot log in", "Wrong charge", "Data request"]),
                "body": _h_sentence(rng),
                "requester": {"display": rng.choice(H_NAMES), "contact": _h_any(rng, 0.7)},
                "tags": [rng.choice(["vip", "refund", "gdpr", "p2"]) for _ in range(2)],
                "thread": [{"from": "agent", "text": _h_sentence(rng)} for _ in range(rng.randint(0, 3))],
            }
        },
    }


def _h_scenario_infra(rng: random.Random) -> dict[str, Any]:
    env = [{"name": "APP_ENV", "value": "production"}, {"name": "LOG_LEVEL", "value": "INFO"}]
    if rng.random() < 0.5:
        env.append({"name": "AWS_SECRET_ACCESS_KEY", "value": T(H_SECRET2, "api_key")})
    else:
        env.append({"name": "AWS_REGION", "value": "eu-west-1"})
    if rng.random() < 0.3:
        env.append({"name": "GIT_SHA", "value": "da39a3ee5e6b4b0d3255bfef95601890afd80709"})
    hosts = [_h_maybe(rng, "ip_address", 0.7) for _ in range(rng.randint(1, 3))]
    return {
        "args": [f"deploy-{rng.randint(100, 999)}"],
        "kwargs": {
            "env": env,
            "hosts": hosts,
            "log_tail": [_h_log(rng) for _ in range(rng.randint(1, 4))],
            "version": rng.choice(["1.2.3", "v2.14.0", "10.0.19045.3803"]),
        },
    }


def _h_scenario_hr(rng: random.Random) -> dict[str, Any]:
    return {
        "args": [rng.randint(1000, 99999)],
        "kwargs": {
            "employee": {
                "name": rng.choice(H_NAMES),
                "ssn": _h_maybe(rng, "ssn", 0.6),
                "tax_id": rng.choice(["12-3456789", "45-0987654"]),
                "zip": rng.choice(["94107-2031", "10001-0001", "73301"]),
                "work_email": _h_maybe(rng, "email", 0.7),
                "start": "2024-04-01",
            }
        },
    }


def _h_scenario_events(rng: random.Random) -> dict[str, Any]:
    events = [
        {
            "type": rng.choice(["page_view", "login", "checkout"]),
            "ts": rng.choice(["2024-03-11T08:15:02Z", "1710145502", "2024-03-11 08:15:02.113"]),
            "ip": _h_maybe(rng, "ip_address", 0.6),
            "ua": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/122.0.6261.94",
            "props": {"x": _h_any(rng, 0.3)},
        }
        for _ in range(rng.randint(1, 5))
    ]
    return {"args": [events], "kwargs": {"source": "web"}}


def _h_scenario_webhook(rng: random.Random) -> dict[str, Any]:
    inner = {
        "event": rng.choice(["customer.updated", "charge.failed", "user.created"]),
        "data": {"object": {"id": f"cus_{rng.getrandbits(48):012x}", "field": _h_any(rng, 0.7)}},
    }
    return {
        "args": [],
        "kwargs": {
            "headers": {"content-type": "application/json", "x-request-id": _h_id(rng)},
            "body": as_json_text(inner),
        },
    }


H_SCENARIOS = [
    _h_scenario_order,
    _h_scenario_ticket,
    _h_scenario_infra,
    _h_scenario_hr,
    _h_scenario_events,
    _h_scenario_webhook,
]
H_TASKS = ["shop.charge", "crm.sync_contact", "ops.deploy", "hr.onboard", "analytics.ingest", "hooks.process"]


def _holdout_generated(rng: random.Random, count: int) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        k = i % len(H_SCENARIOS)
        body = H_SCENARIOS[k](rng)
        message = {"task": H_TASKS[k], "id": _h_id(rng), **body, "retries": 0, "eta": None}
        out.append(record(f"h-gen-{i:04d}", message))
    return out


def _holdout_handwritten() -> list[dict[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("card-kwarg", {"card_number": T("4242 4242 4242 4242", "credit_card"), "amount": 99.5}),
        ("card-args", {"args": [T("5555-5555-5555-4444", "credit_card"), 12.0, "EUR"], "kwargs": {}}),
        ("card-amex", {"kwargs": {"pan": T("3714 496353 98431", "credit_card"), "cvc": "1234"}}),
        (
            "card-in-note",
            {"note": T("pls charge 6011000990139424 again, first try timed out", "credit_card")},
        ),
        ("card-json", {"data": as_json_text({"source": {"number": T("4000056655665556", "credit_card")}})}),
        ("card-masked", {"card": {"last4": "4242", "display": "•••• •••• •••• 4242", "brand": "visa"}}),
        ("card-token", {"payment_method": "pm_1OqXhK2eZvKYlo2CfUu3Hk1a", "customer": "cus_PqR4sT5uV6wX"}),
        ("card-luhn-bad", {"card_number": "4242424242424241"}),
        ("card-jcb", {"card_number": "3566002020360505", "brand": "jcb"}),
        ("card-tracking", {"tracking": "9400 1000 0000 0000 0000 00", "carrier": "usps"}),
        ("card-iban", {"iban": "DE89 3704 0044 0532 0130 00", "bic": "COBADEFFXXX"}),
        ("card-snowflake", {"discord_user": "175928847299117063", "guild": "1158348796553265152"}),
        ("ssn-plain", {"applicant": {"ssn": T("219-09-9999", "ssn"), "dob": "1980-02-29"}}),
        ("ssn-invalid-key", {"ssn": "000-12-3456", "ssn_alt": "666-12-3456"}),
        ("ssn-ein-zip", {"ein": "12-3456789", "zip": "94107-2031", "ssn_last4": "6789"}),
        ("ssn-sentence", {"x": T("Applicant SSN is 529 34 1234? no: 529-34-1234.", "ssn")}),
        ("ssn-masked", {"ssn": "***-**-1234"}),
        ("email-basic", {"to": T("m.rossi@example.net", "email"), "template": "welcome_v2"}),
        ("email-list", {"cc": [T("dpo@example.org", "email"), T("ops-team@example.com", "email"), "nobody"]}),
        ("email-unicode", {"contact": T("jürgen.müller@bücher.example.com", "email")}),
        ("email-idn", {"contact": T("李雷@例子.测试", "email")}),
        ("email-quoted", {"from": T('"Kenji Tanaka"@example.net', "email")}),
        ("email-two", {"body": T("cc a@example.com and b@example.com on this", "email")}),
        ("email-pkgs", {"deps": ["lodash@4.17.21", "@babel/core@7.18.1", "typescript@5.4.2"]}),
        ("email-decorator", {"source": "@app.task(bind=True)\ndef charge(self, card):\n    ...\n"}),
        ("email-handle", {"tweet": "thanks @tanaka and @example for the help!"}),
        ("email-masked", {"email": "m***@example.net", "hint": "an***@exa***.org"}),
        ("email-localhost", {"smtp_user": "postmaster@localhost", "relay": "a@b"}),
        ("phone-us", {"phone": T("(212) 555-0147", "phone")}),
        ("phone-ext", {"desk": T("212-555-0147 ext. 2210", "phone")}),
        ("phone-e164", {"msisdn": T("+442079460018", "phone")}),
        ("phone-intl", {"contact": {"mobile": T("+91 98765 43210", "phone"), "country": "IN"}}),
        ("phone-bare", {"account": "2125550147", "ref": "4155550199"}),
        ("phone-isbn", {"isbn": "978-3-16-148410-0", "isbn10": "0-306-40615-2"}),
        ("phone-date", {"dates": ["2024-03-11", "11.03.2024", "03/11/2024"], "epoch": "1710150902"}),
        ("phone-masked", {"phone": "(***) ***-0147"}),
        ("phone-two-in-text", {"msg": T("home (212) 555-0147, work 312.555.0199", "phone")}),
        ("ip-v4", {"client_ip": T("203.0.113.42", "ip_address"), "port": 443}),
        ("ip-port", {"peer": T("198.51.100.7:5432", "ip_address")}),
        ("ip-cidr", {"allow": [T("10.0.0.0/8", "ip_address"), T("192.0.2.0/24", "ip_address")]}),
        ("ip-v6", {"addr": T("2001:db8::8a2e:370:7334", "ip_address")}),
        ("ip-v6-bracket", {"url": T("http://[2001:db8::1]:8080/health", "ip_address")}),
        ("ip-version", {"version": "6.1.7601.24546", "python": "3.11.7", "oid": "1.3.6.1.4.1.311.21.8"}),
        ("ip-mac", {"mac": "00:1A:2B:3C:4D:5E", "time": "10:30:00"}),
        ("ip-cpp", {"trace": "std::vector<int>::push_back at foo.cpp:42"}),
        ("ip-coords", {"location": "37.7749,-122.4194", "label": "office"}),
        ("ip-hostname", {"host": "ip-10-0-1-23.ec2.internal"}),
        ("key-aws", {"credentials": {"aws_access_key_id": T("AKIAJ7Q3HOLDOUTEXAMP", "api_key")}}),
        (
            "key-aws-secret",
            {
                "aws_access_key_id": T("AKIAJ7Q3HOLDOUTEXAMP", "api_key"),
                "aws_secret_access_key": T(H_SECRET, "api_key"),
            },
        ),
        ("key-secret-nocontext", {"blob": H_SECRET}),
        (
            "key-secret-env",
            {
                "containerDefinitions": [
                    {"environment": [{"name": "MY_APP_SECRET", "value": T(H_SECRET2, "api_key")}]}
                ]
            },
        ),
        (
            "key-secret-text",
            {"config": T(f"[default]\naws_secret_access_key = {H_SECRET}\nregion = eu-west-1\n", "api_key")},
        ),
        ("key-gh", {"token": T("ghp_Hq2Lx9Tb4Vn7Rk1Mw3Zp8Yc5Jd6Fs0Ga2Ke9", "api_key")}),
        (
            "key-slack",
            {"webhook": {"token": T("xoxb-2048117365-5125370986123-Hq2Lx9Tb4Vn7Rk1Mw3Zp8Yc5", "api_key")}},
        ),
        (
            "key-stripe",
            {
                "stripe": {
                    "secret": T("sk_live_51HoldoutFakeKeyQw8Er2Ty6Ui4Op9As", "api_key"),
                    "public": "pk_live_51HoldoutPublishableQw8Er2Ty6Ui4",
                }
            },
        ),
        (
            "key-pem",
            {
                "key": T(
                    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n",
                    "api_key",
                )
            },
        ),
        (
            "key-pem-public",
            {
                "key": "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----\n"
            },
        ),
        (
            "key-placeholders",
            {
                "github": "<YOUR_GITHUB_TOKEN>",
                "aws": "AKIA****************",
                "stripe": "${STRIPE_SECRET_KEY}",
                "pw": "changeme",
            },
        ),
        (
            "key-hashes",
            {
                "sha1": "da39a3ee5e6b4b0d3255bfef95601890afd80709",
                "uuid": "c2d4f1e0-8a7b-4c3d-9e2f-1a0b9c8d7e6f",
            },
        ),
        (
            "mixed-contact",
            {
                "contacts": [
                    {
                        "name": "Maria Rossi",
                        "email": T("m.rossi@example.net", "email"),
                        "phone": T("+39 06 1234 5678", "phone"),
                    },
                    {"name": "Kenji Tanaka", "email": T("k.tanaka@example.org", "email"), "phone": "n/a"},
                    {"name": "Ola Nordmann", "email": None, "phone": T("+47 22 12 34 56", "phone")},
                ]
            },
        ),
        (
            "mixed-log",
            {
                "lines": [
                    T(
                        "2024-03-11 08:15:02 login ok user=anna-lena@example.com ip=192.0.2.10",
                        "email",
                        "ip_address",
                    ),
                    "2024-03-11 08:15:03 logout",
                ]
            },
        ),
        ("root-list", [T("zoë@example.net", "email"), 42, None, {"k": "v"}]),
        ("deep", {"a": {"b": {"c": {"d": [[{"e": T("card 4242-4242-4242-4242 ok", "credit_card")}]]}}}}),
        ("odd-keys", {"contact info": {"e-mail address": T("dpo@example.org", "email")}}),
        ("numbers-not-strings", {"card_number": 4242424242424242, "ssn": 219099999, "phone": 2125550147}),
        (
            "clean-order",
            {
                "order_id": "ord_9f8e7d6c",
                "total": "129.00",
                "currency": "EUR",
                "items": [{"sku": "SKU-4410-B", "qty": 2}],
            },
        ),
    ]
    return [record(f"h-hand-{rid}", payload) for rid, payload in rows]


def _holdout_pools_ok() -> None:
    """Every positive in the holdout pools is PII under the spec's own rules."""
    for digits in H_CARDS:
        assert card_ok(digits), digits
    for text in H_KEYS:
        assert key_ok(text), text
    for text in (H_SECRET, H_SECRET2):
        assert aws_secret_ok(text), text
    for text in H_INTL:
        assert phone_ok(text), text
    for text in H_CARD_NEG:
        digits = re.sub("[ -]", "", text)
        assert not (digits.isdigit() and card_ok(digits) and len(text) in (15, 16, 17, 19)), text


def holdout_records() -> list[dict[str, Any]]:
    """The holdout split (approach B)."""
    _holdout_pools_ok()
    rng = random.Random(H_SEED)
    return _holdout_handwritten() + _holdout_generated(rng, 360)


# ==========================================================================
# DEV (approach A).  The split the detector is tuned on.
# ==========================================================================


D_SEED = 4242

D_CARDS = [
    "4111111111111111",
    "4012888888881881",
    "5105105105105100",
    "5454545454545454",
    "378282246310005",
    "340000000000009",
    "6011111111111117",
    "6011000000000004",
    "2221000000000009",
    "4000000000000077",
    "5577000055770004",
    "4444333322221111",
    "370000000000002",
    "343434343434343",
    "6011601160116611",
    luhn_complete("6500", 16),
    luhn_complete("6440", 16),
    luhn_complete("6490", 16),
    luhn_complete("2720", 16),
    luhn_complete("2500", 16),
    luhn_complete("5100", 16),
]
D_CARD_NEG = [
    "4111111111111112",
    "5105105105105101",
    "378282246310006",
    "3530111333300000",
    "36227206271667",
    "30569309025904",
    luhn_complete("62", 16),
    luhn_complete("67", 16),
    luhn_complete("81", 16),
    luhn_complete("30", 16),
    luhn_complete("2210", 16),
    luhn_complete("2730", 16),
    luhn_complete("6430", 16),
    luhn_complete("35", 15),
    "1214572418931449856",
    "936929561302675456",
    "1710150902123",
    "1710150902123456",
    "1710150902123456789",
    "1Z12345E0205271688",
    "4000 0000 0000 0002 1234 56",
    "FR76 4242 4242 4242 4242 185",
    "9261 2990 1234 5678 9012 34",
    "4111 **** **** 1111",
    "************1111",
    "XXXX XXXX XXXX 4444",
    "Visa ending in 1111",
    "411111XXXXXX1111",
    "tok_1N3T00LkdIwHu7ixt44h1F8k",
    "pm_card_visa",
    "src_1AbCdEfGhIjKlMn",
    "4111.1111.1111.1111",
    "4111 1111 1111 111",
    "4111-1111 1111-1111",
    "41111111111111111",
    "9780306406157",
    "012345678905",
]
D_SSN_NEG = [
    "000-23-4567",
    "666-23-4567",
    "950-23-4567",
    "321-00-4567",
    "321-45-0000",
    "999999999",
    "000000000",
    "666234567",
    "12345-6789",
    "90210-1234",
    "98-7654321",
    "XX-XXXXXXX",
    "***-**-4567",
    "xxx-xx-4567",
    "321 45 6789",
    "SSN-321-45-6789",
    "321-45-67890",
    "1321-45-6789",
]
# Routing numbers that break the SSN rules (group 00); one that keeps them is
# indistinguishable from an SSN by value and is reported as one.
D_ROUTING = ["021000021", "026009593", "121000358"]

D_EMAIL_LOCALS = [
    "jane.doe",
    "john",
    "j.smith+newsletter",
    "support",
    "billing-team",
    "o'brien",
    "josé",
    "müller",
    "user_42",
    "Δοκιμή",
    "ñoño",
    "first.middle.last",
    "hr",
]
D_EMAIL_DOMAINS = [
    "example.com",
    "example.org",
    "sub.example.com",
    "münchen.example",
    "пример.испытание",
    "example.xn--80akhbyknj4f",
    "mail.example.org",
]
D_EMAIL_NEG = [
    "john@",
    "@example.com",
    "x@y",
    "root@localhost",
    "john..doe@example.com",
    ".john@example.com",
    "john.@example.com",
    "express@4.18.2",
    "@types/node@20.11.5",
    "vue@3.4.21",
    "@celery.task",
    "@app.task",
    "@john_doe",
    "j***@example.com",
    "jo**.do*@ex*****.com",
    "john dot doe at example dot com",
    "john(at)example(dot)com",
    "user@example.123",
    "user@example",
    "user@.example.com",
    "user@example..com",
    "user@-example.com",
]

D_US_AREAS = ["415", "202", "305", "773", "404", "503", "702", "919"]
D_INTL = [
    "+31 20 123 4567",
    "+39 06 1234 5678",
    "+65 6123 4567",
    "+27 21 123 4567",
    "+52 55 1234 5678",
    "+55 11 91234-5678",
    "+48 22 123 45 67",
    "+41 44 668 18 00",
    "+358 9 1234567",
    "+90 212 123 45 67",
    "+86 10 1234 5678",
    "+61 3 7010 1234",
    "+44 121 496 0123",
    "+49 (0)30 12345678",
    "+33.1.99.00.12.34",
    "+81-3-1234-5678",
    "+61491570156",
    "+351 21 123 4567",
]
D_PHONE_NEG = [
    "4155550123",
    "14155550123",
    "qty: 1200 units",
    "acct 0012345678",
    "ISBN 978-0-306-40615-7",
    "ISBN-10 0-19-852663-6",
    "90210-1234",
    "2023-12-31",
    "31/12/2023",
    "12.31.2023",
    "1703980800",
    "1703980800000",
    "$12,345.67",
    "1,000,000",
    "(***) ***-0123",
    "***-***-0123",
    "+1 (555) ***-**23",
    "(023) 555-0123",
    "(415) 055-0123",
    "(211) 555-0123",
    "(415) 911-0123",
    "+1 015 555 0123",
    "+999 123 456 789",
    "+44 20 123",
    "+64 9 123 4567",
    "PO-415-555-0123",
    "415-555-0123-7",
    "415-555-01234",
]

D_IPS = [
    "192.0.2.1",
    "198.51.100.23",
    "203.0.113.9",
    "10.0.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "127.0.0.1",
    "255.255.255.255",
    "100.64.0.1",
    "2001:db8::1",
    "2001:0db8:0000:0000:0000:ff00:0042:8329",
    "::1",
    "fe80::a00:27ff:fe4e:66a1",
    "::ffff:198.51.100.23",
    "2001:db8:abcd:12::",
]
D_IP_NEG = [
    "1.0.2",
    "v4.2.1.0",
    "5.4.0-150-generic",
    "10.0.17763.5329",
    "1.2.3.4.5.6",
    "2.16.840.1.113730.3.1.1",
    "08:00:27:4e:66:a1",
    "08-00-27-4E-66-A1",
    "12:34:56",
    "07:45",
    "[01/Jan/2024:00:00:01 +0100]",
    "std::string",
    "std::unordered_map<int, int>",
    "Foo::Bar::baz",
    "40.7128,-74.0060",
    "lat=40.7128 lon=-74.0060",
    "10.0.x.x",
    "192.168.1.*",
    "999.1.1.1",
    "01.02.03.04",
    "10.0.0.1-beta",
    "ip-172-31-5-9.ec2.internal",
    "1.2.3.4-alpha",
]

D_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
D_SECRET2 = "Xk3mQ9vT2pL8wR4nB6yH1cF5gJ0dS7aZeDEVKEY1"
D_KEYS = [
    "AKIAIOSFODNN7EXAMPLE",
    "ASIAY34FZKBOKMUTVV7A",
    "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",
    "ghu_16C7e42F292c6912E7710c838347Ae178B4a",
    "ghr_1B4a2e77838347a7E420ce178F2E7c6912E1",
    "github_pat_11AAAAAAA0DevFakeTok12_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456",
    "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "xoxp-1111111111-2222222222-3333333333-0123456789abcdef0123456789abcdef",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dcDevFake",
    "rk_live_51DevFakeRestrictedKeyAbCdEf12345",
    "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe",
]
D_PEM = [
    "-----BEGIN DSA PRIVATE KEY-----",
    "-----BEGIN PGP PRIVATE KEY BLOCK-----",
    "-----BEGIN PRIVATE KEY-----",
    "-----BEGIN RSA PRIVATE KEY-----",
]
D_KEY_NEG = [
    "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12",
    "d41d8cd98f00b204e9800998ecf8427e",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl",
    "VGhpcyBpcyBub3QgYSBzZWNyZXQsIGp1c3QgYmFzZTY0IHRleHQu",
    "550e8400-e29b-41d4-a716-446655440000",
    "pk_live_51DevFakePublishableAbCdEf12345",
    "pk_test_TYooMQauvdEDq54NiTphI7jx",
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "ghp_************************************",
    "ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "<YOUR_API_KEY>",
    "${AWS_SECRET_ACCESS_KEY}",
    "changeme",
    "password123",
    "xoxb-XXXXXXXXXXXX-XXXXXXXXXXXXX-XXXXXXXXXXXXXXXXXXXXXXXX",
    "-----BEGIN CERTIFICATE-----",
    "-----BEGIN PUBLIC KEY-----",
    "-----BEGIN PGP PUBLIC KEY BLOCK-----",
    "-----BEGIN CERTIFICATE REQUEST-----",
    "AKIAEXAMPLE",
    "sk_live_...",
    D_SECRET,
]

D_POS_SENTENCES = [
    "Please reach me at {a} after 5pm.",
    "My details: {a}, {b}",
    'Customer says: "{a}"',
    "Can you update the record to {a}? Thanks!",
    "{a}",
    "note: {a} / {b}",
    "Refund requested. Ref {a}.",
    "({a})",
    "<li>{a}</li>",
]
D_LOGS = [
    "2023-12-31 23:59:59,999 WARNING [shop.tasks] charge failed for {a}",
    "2023-12-31T23:59:59.123456+00:00 INFO received webhook from {a}",
    "[worker-3] 2023-12-31T23:59:59+00:00 retrying ({n}/5): {a}",
    "time=2023-12-31T23:59:59Z level=info src={a} dst={b}",
    'Traceback (most recent call last):\n  File "tasks.py", line {n}, in charge\nValueError: bad value {a}',
    "{n} | {a} | {b} |",
]
D_NEUTRAL_KEYS = ["note", "data", "x", "value", "comment", "payload", "text", "misc", "input", "arg"]


def _d_card(rng: random.Random) -> T:
    return T(rng.choice(card_formats(rng.choice(D_CARDS))), "credit_card")


def _d_ssn(rng: random.Random) -> T:
    while True:
        area, group, serial = rng.randint(1, 899), rng.randint(1, 99), rng.randint(1, 9999)
        if ssn_ok(area, group, serial):
            break
    if rng.random() < 0.6:
        return T(f"{area:03d}-{group:02d}-{serial:04d}", "ssn")
    return T(f"{area:03d}{group:02d}{serial:04d}", "ssn")


def _d_email(rng: random.Random) -> T:
    return T(f"{rng.choice(D_EMAIL_LOCALS)}@{rng.choice(D_EMAIL_DOMAINS)}", "email")


def _d_phone(rng: random.Random) -> T:
    if rng.random() < 0.4:
        return T(rng.choice(D_INTL), "phone")
    area, line = rng.choice(D_US_AREAS), f"01{rng.randint(0, 99):02d}"
    forms = [
        f"({area}) 555-{line}",
        f"{area}-555-{line}",
        f"{area}.555.{line}",
        f"+1 {area} 555 {line}",
        f"+1{area}555{line}",
        f"1-{area}-555-{line}",
        f"{area}-555-{line} ext. {rng.randint(2, 99)}",
        f"{area} 555 {line}",
        f"+1 ({area}) 555-{line}",
        f"1 {area} 555 {line}",
        f"{area}-555-{line}x{rng.randint(2, 999)}",
    ]
    return T(rng.choice(forms), "phone")


def _d_ip(rng: random.Random) -> T:
    ip = rng.choice(D_IPS)
    roll = rng.random()
    if ":" not in ip and roll < 0.15:
        ip += ":6379"
    elif ":" not in ip and roll < 0.25:
        ip += "/16"
    elif ip.startswith("2001") and roll < 0.2:
        ip = f"[{ip}]:8443"
    return T(ip, "ip_address")


def _d_key(rng: random.Random) -> T:
    if rng.random() < 0.2:
        return T(
            rng.choice(D_PEM) + "\nProc-Type: 4,ENCRYPTED\n\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX\n",
            "api_key",
        )
    return T(rng.choice(D_KEYS), "api_key")


D_POSITIVE: dict[str, Callable[[random.Random], T]] = {
    "credit_card": _d_card,
    "ssn": _d_ssn,
    "email": _d_email,
    "phone": _d_phone,
    "ip_address": _d_ip,
    "api_key": _d_key,
}
D_NEGATIVE = {
    "credit_card": D_CARD_NEG,
    "ssn": D_SSN_NEG,
    "email": D_EMAIL_NEG,
    "phone": D_PHONE_NEG,
    "ip_address": D_IP_NEG,
    "api_key": D_KEY_NEG,
}


def _d_pick(rng: random.Random, pii_rate: float) -> T | str:
    cat = rng.choice(list(D_POSITIVE))
    if rng.random() < pii_rate:
        return D_POSITIVE[cat](rng)
    return rng.choice(D_NEGATIVE[cat])


def _d_wrap(rng: random.Random, value: Any) -> Any:
    """Put a value under a neutral key, at a random depth and shape."""
    key = rng.choice(D_NEUTRAL_KEYS)
    shape = rng.randrange(6)
    if shape == 0:
        return {key: value}
    if shape == 1:
        return {"kwargs": {key: value, "retry": False}}
    if shape == 2:
        return {"args": ["job-17", value], "kwargs": {}}
    if shape == 3:
        return [value]
    if shape == 4:
        return {"data": {"items": [{"id": 1, key: value}]}}
    return {"meta": {"source": "api"}, "body": {key: [None, value]}}


def _d_batteries(rng: random.Random) -> list[dict[str, Any]]:
    """Every pool value once, alone, under a neutral key."""
    out = []
    for cat, pool in D_NEGATIVE.items():
        for i, text in enumerate(pool):
            out.append(record(f"d-neg-{cat}-{i:02d}", _d_wrap(rng, text)))
    for i, digits in enumerate(D_CARDS):
        for j, text in enumerate(card_formats(digits)):
            out.append(record(f"d-pos-card-{i:02d}-{j}", _d_wrap(rng, T(text, "credit_card"))))
    for i, text in enumerate(D_INTL):
        assert phone_ok(text), text
        out.append(record(f"d-pos-intl-{i:02d}", _d_wrap(rng, T(text, "phone"))))
    for i, text in enumerate(D_IPS):
        out.append(record(f"d-pos-ip-{i:02d}", _d_wrap(rng, T(text, "ip_address"))))
    for i, text in enumerate(D_KEYS + D_PEM):
        out.append(record(f"d-pos-key-{i:02d}", _d_wrap(rng, T(text, "api_key"))))
    for i, text in enumerate(D_ROUTING):
        out.append(
            record(f"d-neg-routing-{i}", {"bank": {"routing_number": text, "account": "000123456789"}})
        )
    for i in range(25):
        out.append(record(f"d-pos-ssn-{i:02d}", _d_wrap(rng, _d_ssn(rng))))
        out.append(record(f"d-pos-email-{i:02d}", _d_wrap(rng, _d_email(rng))))
        out.append(record(f"d-pos-phone-{i:02d}", _d_wrap(rng, _d_phone(rng))))
    return out


def _d_texts(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """PII and hard negatives inside sentences and log lines."""
    out = []
    for i in range(count):
        if i % 2:
            text = fmt(rng.choice(D_POS_SENTENCES), a=_d_pick(rng, 0.6), b=_d_pick(rng, 0.4))
        else:
            text = fmt(rng.choice(D_LOGS), a=_d_pick(rng, 0.6), b=_d_pick(rng, 0.4), n=rng.randint(1, 400))
        out.append(record(f"d-text-{i:03d}", _d_wrap(rng, text)))
    return out


D_FIRST = ["Jane", "John", "Ana", "Luis", "Mei", "Omar", "Eva", "Tom"]
D_LAST = ["Doe", "Smith", "García", "Chen", "Haddad", "Novak", "Brown"]


def _d_contact(rng: random.Random) -> dict[str, Any]:
    first, last = rng.choice(D_FIRST), rng.choice(D_LAST)
    contact: dict[str, Any] = {"first_name": first, "last_name": last, "id": rng.randint(1, 10**6)}
    if rng.random() < 0.7:
        contact["email"] = _d_email(rng) if rng.random() < 0.85 else rng.choice(D_EMAIL_NEG)
    if rng.random() < 0.5:
        contact["phone"] = _d_phone(rng) if rng.random() < 0.8 else rng.choice(D_PHONE_NEG)
    contact["created_at"] = f"2023-11-0{rng.randint(1, 9)}T12:00:00Z"
    contact["tags"] = rng.sample(["lead", "customer", "churned", "beta", "eu"], 2)
    return contact


def _d_batches(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Larger payloads (about 1-2 KB): batches of contacts and order lines."""
    out = []
    for i in range(count):
        contacts = [_d_contact(rng) for _ in range(rng.randint(4, 9))]
        lines = [
            {
                "sku": f"SKU-{rng.randint(10000, 99999)}",
                "qty": rng.randint(1, 3),
                "unit_price": f"{rng.randint(1, 300)}.{rng.randint(0, 99):02d}",
                "note": _d_pick(rng, 0.15) if rng.random() < 0.3 else "gift wrap",
            }
            for _ in range(rng.randint(2, 6))
        ]
        payload = {
            "args": [f"batch-{i:04d}"],
            "kwargs": {
                "contacts": contacts,
                "lines": lines,
                "requested_by": _d_email(rng) if rng.random() < 0.5 else "system",
                "options": {"dry_run": False, "locale": "en_US", "currency": "USD"},
            },
        }
        out.append(record(f"d-batch-{i:03d}", payload))
    return out


def _d_flat(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Flat kwargs of typical tasks, PII only where a value calls for it."""
    out = []
    for i in range(count):
        kwargs: dict[str, Any] = {
            "user_id": rng.randint(1, 10**6),
            "order_ref": f"A{rng.randint(10**5, 10**6 - 1)}-{rng.choice('XYZ')}",
            "status": rng.choice(["pending", "paid", "failed", "refunded"]),
            "amount": f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}",
            "updated": "2023-12-31T23:59:59Z",
        }
        for _ in range(rng.randint(1, 3)):
            kwargs[rng.choice(["field", "extra", "contact", "remote", "credential", "memo"])] = _d_pick(
                rng, 0.5
            )
        if rng.random() < 0.3:
            kwargs["raw"] = as_json_text(
                {"k": _d_pick(rng, 0.6), "n": rng.randint(1, 9)}, indent=rng.choice([None, 2])
            )
        out.append(record(f"d-flat-{i:03d}", {"kwargs": kwargs}))
    return out


def _d_handwritten() -> list[dict[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("root-string", T("call me: (415) 555-0123", "phone")),
        ("root-string-clean", "nothing to see here"),
        ("root-int", 4111111111111111),
        (
            "docs-charge",
            {
                "args": [
                    T("4111 1111 1111 1111", "credit_card"),
                    99.5,
                    {"email": T("ann@example.com", "email"), "tier": "gold"},
                ]
            },
        ),
        ("sentence-two-emails", {"body": T("write to jane@example.com or jane.doe@example.org", "email")}),
        ("sentence-email-phone", {"body": T("jane@example.com / (415) 555-0123", "email", "phone")}),
        ("ssn-under-ssn-bad", {"ssn": "666-01-2345", "ssn2": "123-00-4567", "ssn3": "900-12-3456"}),
        ("zip4", {"address": {"zip": "90210-1234", "city": "Beverly Hills"}}),
        ("ein", {"company": {"ein": "98-7654321"}}),
        ("pn-prefix", {"part": "PN-209-60-5853", "code": "ABC-123-4567"}),
        ("id-prefix", {"id": "ID123456789", "ref": "v1.2.3.4"}),
        ("ip-hostnames", {"hosts": ["ip-10-0-1-23.ec2.internal", "10.0.0.1-beta"]}),
        ("ip-oid", {"oid": "1.3.6.1.4.1.311.21.8", "ver": "1.2.3.4.5"}),
        (
            "nginx",
            {
                "line": T(
                    '203.0.113.9 - - [01/Jan/2024:00:00:01 +0100] "GET / HTTP/1.1" 200 612', "ip_address"
                )
            },
        ),
        (
            "nginx-clean",
            {"line": '- - [01/Jan/2024:00:00:01 +0100] "GET /health HTTP/1.1" 200 2 "-" "kube-probe/1.29"'},
        ),
        ("cpp", {"sig": "void f(std::vector<std::string> const&) noexcept"}),
        ("mac-time", {"mac": "3C:22:FB:01:9A:7E", "at": "23:59:59"}),
        ("coords", {"geo": "40.7128, -74.0060", "geo2": [40.7128, -74.006]}),
        ("masked-ip", {"ip": "203.0.x.x"}),
        ("hex-digits", {"hash": "a3f5c2d4111111111111111e9", "b64": "QUJDNDExMTExMTExMTExMTExMQ=="}),
        ("uuid", {"id": "4111c2d4-1111-4111-8111-111111111111"}),
        ("pk-live", {"stripe_publishable_key": "pk_live_51DevFakePublishableAbCdEf12345"}),
        (
            "placeholders",
            {
                "token": "<YOUR_GITHUB_TOKEN>",
                "key": "AKIA****************",
                "s": "${STRIPE_SECRET_KEY}",
                "p": "changeme",
            },
        ),
        (
            "pem-public",
            {
                "cert": "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\n-----END CERTIFICATE-----"
            },
        ),
        (
            "pem-private-escaped",
            {
                "env": T(
                    "KEY='-----BEGIN EC PRIVATE KEY-----\\nMHcCAQEEIIrYSSNQFaA2Hwf1duRSxKtLYX5CB04fSeQ6tF1aY/PuoAoGCCqGSM49\\n-----END EC PRIVATE KEY-----'",
                    "api_key",
                )
            },
        ),
        (
            "aws-pair",
            {
                "aws_access_key_id": T("AKIAIOSFODNN7EXAMPLE", "api_key"),
                "aws_secret_access_key": T(D_SECRET, "api_key"),
            },
        ),
        (
            "aws-sts",
            {
                "Credentials": {
                    "AccessKeyId": T("ASIAY34FZKBOKMUTVV7A", "api_key"),
                    "SecretAccessKey": T(D_SECRET2, "api_key"),
                    "SessionToken": "FwoGZXIvYXdzEBYaDExampleSessionTokenOnlyForTests",
                }
            },
        ),
        (
            "aws-env-list",
            {
                "env": [
                    {"name": "AWS_ACCESS_KEY_ID", "value": T("AKIAIOSFODNN7EXAMPLE", "api_key")},
                    {"name": "AWS_SECRET_ACCESS_KEY", "value": T(D_SECRET, "api_key")},
                    {"name": "REGION", "value": "us-east-1"},
                ]
            },
        ),
        ("aws-secret-no-context", {"value": D_SECRET, "name": "blob"}),
        (
            "aws-secret-yaml",
            {"config": T(f"aws:\n  region: us-east-1\n  AWS_SECRET_ACCESS_KEY: {D_SECRET2}\n", "api_key")},
        ),
        (
            "aws-secret-shell",
            {
                "script": T(
                    f'export AWS_SECRET_ACCESS_KEY="{D_SECRET}"\nexport AWS_REGION=us-east-1', "api_key"
                )
            },
        ),
        (
            "aws-secret-json-text",
            {
                "raw": T(
                    '{"SecretAccessKey": "' + D_SECRET2 + '", "Expiration": "2024-01-01T00:00:00Z"}',
                    "api_key",
                )
            },
        ),
        ("secret-hex-under-secret", {"secret_hash": "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12"}),
        ("secret-placeholder", {"client_secret": "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"}),
        (
            "gh-in-script",
            {
                "script": T(
                    "git clone https://github.com/org/repo.git  # GH_TOKEN=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",
                    "api_key",
                )
            },
        ),
        (
            "slack-in-header",
            {
                "headers": {
                    "Authorization": T(
                        "Bearer xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "api_key"
                    )
                }
            },
        ),
        (
            "stripe-in-curl",
            {
                "cmd": T(
                    "curl https://api.stripe.com/v1/charges -u sk_live_4eC39HqLyjWDarjtT1zdp7dcDevFake:",
                    "api_key",
                )
            },
        ),
        (
            "json-in-string",
            {
                "body": T(
                    '{"customer": {"email": "jane@example.com", "phone": "+1 415 555 0123", "card": "4111111111111111"}}',
                    "email",
                    "phone",
                    "credit_card",
                )
            },
        ),
        ("json-in-string-clean", {"body": '{"event": "ping", "ts": 1703980800, "version": "1.2.3"}'}),
        (
            "contacts-list",
            {
                "contacts": [
                    {"email": T("a@example.com", "email")},
                    {"email": "n/a"},
                    {"email": T("c@example.org", "email"), "phone": T("202-555-0143", "phone")},
                ]
            },
        ),
        (
            "odd-keys",
            {
                "key with space": T("198.51.100.23", "ip_address"),
                "dotted.key": {"x": T("2001:db8::1", "ip_address")},
            },
        ),
        ("tuple-like", {"args": [[1, 2, [3, [T("jane@example.com", "email")]]]]}),
        ("amounts", {"total": "$1,234,567.89", "eur": "1.234.567,89 €", "big": "4111111111111111.00"}),
        ("dates", {"d1": "2023-12-31", "d2": "31.12.2023", "d3": "12/31/2023 11:59 PM", "ts": "1703980800"}),
        ("versions", {"python": "3.11.7", "os": "10.0.22631.3007", "pkg": "celery==5.3.6"}),
        ("npm", {"deps": "express@4.18.2 @types/node@20.11.5 vue@3.4.21"}),
        ("decorators", {"code": "@app.task(bind=True, pii_fields=['email'])\ndef notify(self, email): ..."}),
        ("handles", {"text": "cc @jane and @ops-team, see @app.task docs"}),
        (
            "masked-all",
            {
                "card": "**** **** **** 4242",
                "ssn": "***-**-6789",
                "email": "j***@example.com",
                "phone": "(***) ***-0123",
            },
        ),
        (
            "spelled",
            {
                "email": "jane at example dot com",
                "phone": "four one five, five five five, zero one two three",
            },
        ),
        ("unicode-email", {"email": T("josé@münchen.example", "email")}),
        ("quoted-local", {"from": T('"jane doe"@example.com', "email")}),
        ("quoted-in-log", {"log": 'msg="login failed" user="@example.com"'}),
        ("email-in-mailto", {"html": T('<a href="mailto:support@example.com">Support</a>', "email")}),
        ("ext-phone", {"desk": T("415.555.0123 ext 204", "phone")}),
        ("cvv-after-card", {"raw": T("4111111111111111 12/26 123", "credit_card")}),
        ("cards-two", {"raw": T("4111111111111111 5555555555554444", "credit_card")}),
        ("phones-two", {"raw": T("415-555-0123 415-555-0199", "phone")}),
        ("ssn-then-words", {"raw": T("ssn 321-45-6789; dob 1980-01-01", "ssn")}),
        ("ipv6-loopback-bracket", {"url": T("http://[::1]:8000/", "ip_address")}),
        ("deep-clean", {"a": [[[[[[{"b": "ok"}]]]]]]}),
        ("empty", {}),
        ("empty-list", []),
    ]
    return [record(f"d-hand-{rid}", payload) for rid, payload in rows]


def _dev_pools_ok() -> None:
    for digits in D_CARDS:
        assert card_ok(digits), digits
    for text in D_KEYS:
        assert key_ok(text), text
    for text in (D_SECRET, D_SECRET2):
        assert aws_secret_ok(text), text


def dev_records() -> list[dict[str, Any]]:
    """The dev split (approach A)."""
    _dev_pools_ok()
    rng = random.Random(D_SEED)
    return _d_handwritten() + _d_batteries(rng) + _d_texts(rng, 110) + _d_batches(rng, 40) + _d_flat(rng, 70)


# --------------------------------------------------------------------------


def _dump(records: Sequence[dict[str, Any]]) -> str:
    ids = [r["id"] for r in records]
    if len(ids) != len(set(ids)):  # pragma: no cover - generator bug
        raise SystemExit("duplicate ids")
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or ``--check``) both splits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, build in (("holdout", holdout_records), ("dev", dev_records)):
        text = _dump(build())
        path = HERE / f"{name}.jsonl"
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            sys.stdout.write(f"{path.name}: {text.count(chr(10))} payloads\n")
    if stale:
        sys.stdout.write("stale: " + ", ".join(stale) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
