"""Tests for celery_pii._detect (what PII_DETECTION.md says counts)."""

from __future__ import annotations

import enum
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from celery_pii import _detect
from celery_pii._detect import (
    CATEGORIES,
    DEFAULT_MAX_DEPTH,
    Finding,
    ScanResult,
    detect,
    detect_with_status,
    scan_leaf,
    scan_text,
)

CORPUS = Path(__file__).resolve().parents[1] / "data" / "detection"

# All values below are fake: test card numbers, made-up SSNs, example.*
# domains, 555-01xx and drama phone ranges, documentation IP ranges and keys
# invented for these tests.
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documentation example


def cats(text: str) -> set[str]:
    return scan_text(text)


class TestApi:
    """Tests for detect, detect_with_status, scan_text and scan_leaf."""

    def test_categories(self):
        """The six category names, in the order findings use."""
        assert CATEGORIES == ("credit_card", "ssn", "email", "phone", "ip_address", "api_key")

    def test_finding_is_frozen(self):
        """Findings are immutable values."""
        finding = Finding("a", "email")
        with pytest.raises(AttributeError):
            finding.path = "b"  # type: ignore[misc]
        assert finding == Finding("a", "email")

    def test_paths_and_order(self):
        """Findings come in walk order, then category order, with field paths."""
        payload = {
            "customer": {"email": "ann@example.com", "note": "call (415) 555-0123 or ann@example.org"},
            "contacts": [{"email": "x"}, {"email": "y"}, {"email": "bob@example.com"}],
            "card": "4111 1111 1111 1111",
        }
        assert detect(payload) == [
            Finding("customer.email", "email"),
            Finding("customer.note", "email"),
            Finding("customer.note", "phone"),
            Finding("contacts[2].email", "email"),
            Finding("card", "credit_card"),
        ]

    def test_root_list_and_tuple(self):
        """Positional arguments get [N] paths."""
        assert detect([1, "ann@example.com"]) == [Finding("[1]", "email")]
        assert detect(({"email": "ann@example.com"},)) == [Finding("[0].email", "email")]

    def test_root_string(self):
        """A string at the root has the empty path."""
        assert detect("ann@example.com") == [Finding("", "email")]
        assert detect("nothing here") == []

    def test_other_roots(self):
        """Numbers, None and bytes hold no findings."""
        assert detect(4111111111111111) == []
        assert detect(None) == []
        assert detect(b"ann@example.com") == []

    def test_keys_are_not_pii(self):
        """Dict keys are never scanned, only values."""
        assert detect({"ann@example.com": "x", "4111111111111111": 1}) == []

    def test_non_string_leaves_ignored(self):
        """Only string leaves count: ints, floats, None and bools do not."""
        assert detect({"card": 4111111111111111, "ssn": 219099999, "ok": True, "x": None, "f": 1.5}) == []

    def test_one_finding_per_leaf_and_category(self):
        """Two emails in one leaf give one finding; an email and a phone give two."""
        assert detect({"t": "a@example.com, b@example.com"}) == [Finding("t", "email")]
        assert detect({"t": "a@example.com (415) 555-0123"}) == [Finding("t", "email"), Finding("t", "phone")]

    def test_odd_keys_quoted(self):
        """Keys that are not names are rendered as quoted brackets (an int key as JSON writes it, not an index)."""
        found = detect({"contact info": {"e-mail": "ann@example.com", 3: "192.0.2.1"}})
        assert found == [
            Finding('["contact info"].e-mail', "email"),
            Finding('["contact info"]["3"]', "ip_address"),
        ]

    def test_scan_text_returns_set(self):
        """scan_text gives the set of categories in one string."""
        assert scan_text("ann@example.com 192.0.2.1") == {"email", "ip_address"}
        assert scan_text("") == set()

    def test_scan_leaf_context(self):
        """scan_leaf applies the AWS rule from the key name and parent dict."""
        assert scan_leaf(SECRET) == set()
        assert scan_leaf(SECRET, key="aws_secret_access_key") == {"api_key"}
        assert scan_leaf(SECRET, key="value", parent={"name": "AWS_SECRET_ACCESS_KEY", "value": SECRET}) == {
            "api_key"
        }

    @pytest.mark.parametrize("cap", ["max_leaves", "max_chars", "max_depth"])
    @pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
    def test_caps_validated(self, cap, bad):
        """Caps must be positive integers; the message names the argument only."""
        with pytest.raises(ValueError, match=cap):
            detect_with_status({}, **{cap: bad})

    def test_detect_with_status_is_a_tuple(self):
        """The result unpacks as (findings, truncated)."""
        findings, truncated = detect_with_status({"e": "ann@example.com"})
        assert findings == [Finding("e", "email")]
        assert truncated is False
        assert isinstance(detect_with_status("x"), ScanResult)


class TestBoundaries:
    """Tests for the token-boundary rules (all categories but email)."""

    @pytest.mark.parametrize(
        "text",
        [
            "ID123456789",
            "v1.2.3.4",
            "a3f5c2d4111111111111111e9",
            "QUJDNDExMTExMTExMTExMTExMQ==",
            "PN-209-60-5853",
            "ABC-123-4567",
            "10.0.0.1-beta",
            "ip-10-0-1-23.ec2.internal",
            "x4111111111111111",
            "4111111111111111_x",
            "4111111111111111.00",
            "call 415-555-0123.ext",
            "1.2.3.4.5",
            "9400 1000 0000 0000 0000 00",
            "4000 0000 0000 0002 1234 56",
            "FR76 4242 4242 4242 4242 185",
            "DE89 3704 0044 0532 0130 00",
            "12-219-09-9999",
            "xAKIAIOSFODNN7EXAMPLE",
            "AKIAIOSFODNN7EXAMPLEX",
            "1.3.6.1.4.1.311.21.8",
        ],
    )
    def test_glued_or_partial_is_not_pii(self, text):
        """A match touching a word character or glued by '.'/'-' belongs to a larger token."""
        assert cats(text) == set()

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("card: 4111111111111111.", {"credit_card"}),
            ("(4111 1111 1111 1111)", {"credit_card"}),
            ("ssn=219-09-9999;", {"ssn"}),
            ('"219099999"', {"ssn"}),
            ("ip 10.0.0.1, next", {"ip_address"}),
            ("<192.0.2.1>", {"ip_address"}),
            ("4111111111111111 12/26 123", {"credit_card"}),
            ("415-555-0123 415-555-0199", {"phone"}),
            ("10.0.0.1 10.0.0.2", {"ip_address"}),
            ("ID-12 4111111111111111", {"credit_card"}),
        ],
    )
    def test_punctuation_and_spaces_separate(self, text, expected):
        """Punctuation, brackets and spaces end a token; space-free pieces of a run count."""
        assert cats(text) == expected

    def test_email_has_no_boundary_rule(self):
        """An email glued to text is still an email."""
        assert cats("mailto:ann@example.com") == {"email"}
        assert cats("xann@example.comx") == {"email"}


class TestCreditCard:
    """Tests for credit_card."""

    @pytest.mark.parametrize(
        "text",
        [
            "4111111111111111",
            "4242 4242 4242 4242",
            "4012-8888-8888-1881",
            "5555555555554444",
            "5105 1051 0510 5100",
            "2223003122003222",
            "2221000000000009",
            "378282246310005",
            "3782 822463 10005",
            "3714-496353-98431",
            "340000000000009",
            "6011111111111117",
            "6011 0009 9013 9424",
            "6445644564456445",
            "6500000000000002",
        ],
    )
    def test_cards(self, text):
        """Test numbers of every listed brand, contiguous, 4-4-4-4 or Amex 4-6-5."""
        assert cats(text) == {"credit_card"}
        assert cats(f"please charge {text} today") == {"credit_card"}

    @pytest.mark.parametrize(
        "text",
        [
            "4111111111111112",
            "378282246310006",
            "3566002020360505",
            "3056930009020004",
            "6200000000000005",
            "6759649826438453",
            "4222222222222",
            "41111111111111111",
            "1158348796553265152",
            "1718035231123456",
            "1700000000000",
            "9400100000000000000000",
            "1Z999AA10123456784",
            "**** **** **** 4242",
            "XXXX-XXXX-XXXX-1111",
            "411111******1111",
            "pm_1OqXhK2eZvKYlo2CfUu3Hk1a",
            "tok_visa",
            "4111.1111.1111.1111",
            "4111-1111 1111-1111",
            "4111 1111 1111 111",
            "378 282 246 310 005",
            "5901234123457",
        ],
    )
    def test_not_cards(self, text):
        """Luhn failures, brandless numbers, barcodes, ids, masks, tokens, odd groupings."""
        assert "credit_card" not in cats(text)


class TestSsn:
    """Tests for ssn."""

    @pytest.mark.parametrize("text", ["219-09-9999", "529-34-1234", "219099999", "SSN: 772-01-4321."])
    def test_ssns(self, text):
        """AAA-GG-SSSS or nine contiguous digits with valid area, group and serial."""
        assert cats(text) == {"ssn"}

    @pytest.mark.parametrize(
        "text",
        [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "999-12-3456",
            "123-00-4567",
            "123-45-0000",
            "000123456",
            "666123456",
            "912345678",
            "94107-2031",
            "12-3456789",
            "***-**-6789",
            "XXX-XX-1234",
            "219 09 9999",
            "219-09-99999",
            "219.09.9999",
        ],
    )
    def test_not_ssns(self, text):
        """Invalid SSA forms, ZIP+4, EINs, masks and other groupings."""
        assert "ssn" not in cats(text)

    def test_invalid_under_ssn_key(self):
        """Values decide, not key names."""
        assert detect({"ssn": "000-12-3456", "ssn2": "666-01-2345"}) == []

    def test_value_decides_for_nine_digits(self):
        """Nine digits that keep the SSA rules are an SSN whatever they were meant as."""
        assert cats("322271627") == {"ssn"}
        assert cats("021000021") == set()  # group 00


class TestEmail:
    """Tests for email."""

    @pytest.mark.parametrize(
        "text",
        [
            "ann@example.com",
            "first.last+tag@sub.example.org",
            "o'brien@example.com",
            "user_42@example.net",
            "josé@münchen.example",
            "李雷@例子.测试",
            "Δοκιμή@example.xn--80akhbyknj4f",
            '"john doe"@example.com',
            "Write to ann@example.com.",
            "<ann@example.com>",
            '{"email": "ann@example.com"}',
        ],
    )
    def test_emails(self, text):
        """Dot-atom (Unicode letters allowed) or quoted local parts, real domains."""
        assert cats(text) == {"email"}

    @pytest.mark.parametrize(
        "text",
        [
            "user@",
            "@example.com",
            "a@b",
            "name@localhost",
            "john..doe@example.com",
            ".john@example.com",
            "john.@example.com",
            "lodash@4.17.21",
            "@babel/core@7.18.1",
            "react-dom@^18.2.0",
            "@app.task",
            "`@app.task`",
            "@app.task(bind=True)",
            "@jane",
            "thanks @jane!",
            "j***@example.com",
            "jo**.do*@ex*****.com",
            "jane at example dot com",
            "jane[at]example[dot]com",
            "user@example.c",
            "user@example.123",
            "user@exa_mple.com",
            "user@-example.com",
            "user@example-.com",
            "user@example..com",
            'msg="login failed" user="@example.com"',
            "src=.john@example.com",
            "ref=@example.net",
        ],
    )
    def test_not_emails(self, text):
        """Missing parts, bad dots, package specs, decorators, handles, masks."""
        assert "email" not in cats(text)

    def test_long_local_part(self):
        """A local part over 64 characters is not an address."""
        assert cats("a" * 65 + "@example.com") == set()
        assert cats("a" * 64 + "@example.com") == {"email"}


US_PHONES = [
    "(415) 555-0123",
    "(415)555-0123",
    "415-555-0123",
    "415.555.0123",
    "415 555 0123",
    "+1 415 555 0123",
    "+1-415-555-0123",
    "+1 (415) 555-0123",
    "+14155550123",
    "1-415-555-0123",
    "1 (415) 555-0123",
    "415-555-0123 ext. 12",
    "415-555-0123x12",
    "Call me at (202) 555-0143 after 5pm.",
]
INTL_PHONES = [
    "+44 20 7946 0018",
    "+44 (0)20 7946 0958",
    "+442079460018",
    "+49 30 12345678",
    "+33 1 99 00 12 34",
    "+33.1.99.00.12.34",
    "+81-3-1234-5678",
    "+91 98765 43210",
    "+61 2 5550 1234",
]


class TestPhone:
    """Tests for phone (with phonenumbers installed)."""

    @pytest.mark.parametrize("text", US_PHONES + INTL_PHONES)
    def test_phones(self, text):
        """US formats with valid NANP codes; international numbers valid for their country."""
        assert cats(text) == {"phone"}

    @pytest.mark.parametrize(
        "text",
        [
            "4155550123",
            "14155550123",
            "+1 123 456 7890",
            "(123) 456-7890",
            "(023) 555-0123",
            "911-555-0123",
            "415-911-0123",
            "415-055-0123",
            "415-555-01234",
            "415-555-0123-7",
            "qty 1,500",
            "978-3-16-148410-0",
            "0-306-40615-2",
            "94107-2031",
            "2024-03-11",
            "11.03.2024",
            "1710150902",
            "$1,204,332.10",
            "(***) ***-0123",
            "+1 (***) ***-**23",
            "+999 1234 5678",
            "+44 20 1234",
            "+64 9 123 4567",
            "+44 20 (7946) 0018",
            "(020) 7946 0018",
        ],
    )
    def test_not_phones(self, text):
        """Bare digits, invalid NANP codes, ISBNs, dates, amounts, masks, invalid numbers."""
        assert "phone" not in cats(text)

    def test_phonenumbers_is_used(self):
        """The library validates international numbers when installed."""
        assert _detect.PHONENUMBERS is not None


class TestPhoneFallback:
    """Tests for the phone rules without the 'phone' extra."""

    @pytest.fixture(autouse=True)
    def _no_phonenumbers(self, monkeypatch):
        monkeypatch.setattr(_detect, "PHONENUMBERS", None)

    @pytest.mark.parametrize("text", US_PHONES + INTL_PHONES)
    def test_phones(self, text):
        """Every format is still found."""
        assert cats(text) == {"phone"}

    @pytest.mark.parametrize(
        "text",
        ["4155550123", "+1 123 456 7890", "+999 1234 5678", "+44 2 123", "+42 1234 5678", "+4 4207 946 0018"],
    )
    def test_rejects(self, text):
        """Unassigned country codes, short numbers and invalid NANP codes are refused."""
        assert "phone" not in cats(text)

    def test_known_limit(self):
        """Without the library a number's national plan is not checked (documented)."""
        assert cats("+64 9 123 4567") == {"phone"}


class TestIpAddress:
    """Tests for ip_address."""

    @pytest.mark.parametrize(
        "text",
        [
            "192.0.2.1",
            "198.51.100.7:5432",
            "10.0.0.0/8",
            "0.0.0.0",  # noqa: S104 - a value to detect, not a bind address
            "255.255.255.0",
            "127.0.0.1",
            "http://203.0.113.9/health",
            "2001:db8::8a2e:370:7334",
            "2001:0db8:0000:0000:0000:ff00:0042:8329",
            "::1",
            "fe80::1%eth0",
            "::ffff:192.0.2.128",
            "[2001:db8::1]:8080",
            "2001:db8::/32",
            "login from 2001:DB8::1.",
        ],
    )
    def test_addresses(self, text):
        """Whole dotted quads (any range, with port or CIDR) and IPv6 forms."""
        assert cats(text) == {"ip_address"}

    @pytest.mark.parametrize(
        "text",
        [
            "1.2.3",
            "6.1.7601.24546",
            "256.1.1.1",
            "192.168.001.010",
            "00:1A:2B:3C:4D:5E",
            "00-1A-2B-3C-4D-5E",
            "10:30:00",
            "23:59:59.999",
            "[10/Oct/2023:13:55:36 +0000]",
            "std::vector<int>",
            "boost::asio::ip::tcp",
            "Foo::Bar::baz",
            "37.7749,-122.4194",
            "(51.5074, -0.1278)",
            "203.0.x.x",
            "192.168.*.*",
            "Title :: Section",
            "1:2:3:4:5:6:7:8:9",
        ],
    )
    def test_not_addresses(self, text):
        """Versions, MACs, times, log timestamps, C++ scopes, coordinates, masks."""
        assert "ip_address" not in cats(text)


class TestApiKey:
    """Tests for api_key."""

    @pytest.mark.parametrize(
        "text",
        [
            "AKIAIOSFODNN7EXAMPLE",
            "ASIAY34FZKBOKMUTVV7A",
            "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",
            "gho_7Yt2Qw9Er4Ty1Ui6Op3As8Df5Gh0Jk2Lz7Xc",
            "github_pat_11AAAAAAA0DevFakeTok12_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456",
            "github_pat_11ZZZZZZZ0TestFakeTok1_Qw8Er2Ty6Ui4Op9As1Df5Zx3Jk7Lz0Xc2Vb8Nm4Qw6Er1Ty9Ui3Op5As7Df",
            "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
            "xoxp-1111111111-2222222222-3333333333-0123456789abcdef0123456789abcdef",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dcTestFake",
            "rk_live_51TestFakeRestrictedKeyAbCdEf12345",
            "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe",
            "Authorization: Bearer sk_live_4eC39HqLyjWDarjtT1zdp7dcTestFake",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE...",
            "KEY='-----BEGIN OPENSSH PRIVATE KEY-----\\nb3Blbn...'",
            "-----BEGIN PRIVATE KEY-----",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----",
            "-----BEGIN PGP PRIVATE KEY BLOCK-----",
            f"aws_secret_access_key = {SECRET}",
            f"AWS_SECRET_ACCESS_KEY: {SECRET}",
            f'export AWS_SECRET_ACCESS_KEY="{SECRET}"',
            f'{{"SecretAccessKey": "{SECRET}"}}',
        ],
    )
    def test_keys(self, text):
        """Keys by format, PEM private-key headers, AWS secrets after their name."""
        assert cats(text) == {"api_key"}

    @pytest.mark.parametrize(
        "text",
        [
            "da39a3ee5e6b4b0d3255bfef95601890afd80709",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "SGVsbG8sIFdvcmxkISBUaGlzIGlzIGEgYmFzZTY0IGJsb2I=",
            "c2d4f1e0-8a7b-4c3d-9e2f-1a0b9c8d7e6f",
            "pk_live_51TestFakePublishableQw8Er2Ty6Ui4",
            "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
            "ghp_XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            "ghp_XXXX…",
            "<YOUR_GITHUB_TOKEN>",
            "AKIA****************",
            "AKIAXXXXXXXXXXXXXXXX",
            "${STRIPE_SECRET_KEY}",
            "changeme",
            "xoxb-your-bot-token",
            "-----BEGIN PUBLIC KEY-----",
            "-----BEGIN CERTIFICATE-----",
            "-----BEGIN RSA PUBLIC KEY-----",
            SECRET,
            f"note: {SECRET}",
            "aws_secret_access_key = da39a3ee5e6b4b0d3255bfef95601890afd80709",
        ],
    )
    def test_not_keys(self, text):
        """Hashes, base64, UUIDs, publishable/test keys, placeholders, public PEM."""
        assert "api_key" not in cats(text)

    def test_aws_secret_by_key_name(self):
        """A 40-character secret counts under a key containing 'secret'."""
        payload = {
            "aws_secret_access_key": SECRET,
            "Credentials": {"SecretAccessKey": SECRET},
            "blob": SECRET,
            "secret_hash": "da39a3ee5e6b4b0d3255bfef95601890afd80709",
            "client_secret": "X" * 40,
        }
        assert detect(payload) == [
            Finding("aws_secret_access_key", "api_key"),
            Finding("Credentials.SecretAccessKey", "api_key"),
        ]

    def test_aws_secret_name_value_entry(self):
        """It also counts as the value of a {"name": "...SECRET...", "value": ...} entry."""
        payload = {
            "env": [
                {"name": "AWS_SECRET_ACCESS_KEY", "value": SECRET},
                {"name": "BLOB", "value": SECRET},
                {"Name": "MY_APP_SECRET", "Value": SECRET},
            ]
        }
        assert detect(payload) == [Finding("env[0].value", "api_key"), Finding("env[2].Value", "api_key")]

    def test_secret_in_list_under_secret_key(self):
        """Only the leaf's own key name gives context."""
        assert detect({"secrets": [SECRET]}) == []


class TestCaps:
    """Tests for the work caps and the truncation flag."""

    def test_not_truncated(self):
        """A normal payload is scanned completely."""
        assert detect_with_status({"a": ["ann@example.com"] * 10}).truncated is False

    def test_max_leaves(self):
        """Past max_leaves the walk stops and says so."""
        payload = ["ann@example.com"] * 10
        result = detect_with_status(payload, max_leaves=3)
        assert result == ScanResult([Finding(f"[{i}]", "email") for i in range(3)], truncated=True)

    def test_max_leaves_counts_containers(self):
        """Empty containers count too, so a list of empty lists is bounded."""
        assert detect_with_status([[]] * 100, max_leaves=50).truncated is True

    def test_max_chars(self):
        """The walk stops before a leaf that would pass max_chars."""
        payload = ["ann@example.com", "x" * 100, "bob@example.com"]
        result = detect_with_status(payload, max_chars=50)
        assert result == ScanResult([Finding("[0]", "email")], truncated=True)

    def test_max_chars_root_string(self):
        """A root string longer than max_chars is not scanned at all."""
        assert detect_with_status("ann@example.com", max_chars=5) == ScanResult([], truncated=True)

    def test_max_depth_skips_and_continues(self):
        """Containers deeper than max_depth are skipped; siblings are still scanned."""
        payload = {"deep": [[["ann@example.com"]]], "flat": "bob@example.com"}
        result = detect_with_status(payload, max_depth=3)
        assert result == ScanResult([Finding("flat", "email")], truncated=True)
        assert detect_with_status(payload, max_depth=4).findings[0] == Finding("deep[0][0][0]", "email")

    def test_default_depth_matches_paths(self):
        """The default depth is the longest path _paths accepts."""
        from celery_pii._paths import MAX_PATH_PARTS

        assert DEFAULT_MAX_DEPTH == MAX_PATH_PARTS

    @pytest.mark.parametrize("kind", ["list", "dict"])
    def test_very_deep_nesting(self, kind):
        """100k levels of nesting neither recurse nor hang."""
        value: object = "ann@example.com"
        for _ in range(100_000):
            value = [value] if kind == "list" else {"k": value}
        result = detect_with_status(value)
        assert result.truncated is True
        assert result.findings == []

    def test_cycle_terminates(self):
        """A self-referencing list is cut off by the depth cap."""
        loop: list[object] = ["ann@example.com"]
        loop.append(loop)
        result = detect_with_status(loop)
        assert result.truncated is True
        assert result.findings[0] == Finding("[0]", "email")


ADVERSARIAL = {
    "dotted domain": "a@" + "a." * 100_000,
    "many at signs": "a@" * 100_000,
    "quoted locals": '"a"@' * 50_000,
    "dash digits": "1-" * 100_000,
    "space digits": "1 " * 100_000,
    "dot digits": "1." * 100_000,
    "paren digits": "(1)" * 70_000,
    "plus digits": "+1 " * 70_000,
    "digit run": "4" * 200_000,
    "card run": "4111111111111111 " * 12_000,
    "colons": ":" * 200_000,
    "hex colons": "a:" * 100_000,
    "double colons": "1::" * 70_000,
    "hex": "deadbeef" * 25_000,
    "base64": "QUJD" * 50_000,
    "slack prefix": "xoxb-" * 40_000,
    "slack groups": "xoxb-1-" * 30_000,
    "aws prefix": "AKIA" * 50_000,
    "github prefix": "ghp_" * 50_000,
    "stripe long": "sk_live_a" * 200_000,
    "pem prefix": "-----BEGIN " * 20_000,
    "pem words": "-----BEGIN A " * 100_000,
    "secret assign": "secret=" * 30_000,
    "secret name": "secret_" * 200_000,
    "dots": "." * 200_000,
    "mixed": ("x" * 30 + "@" + "1" * 30 + ":") * 3_000,
}


class TestAdversarial:
    """Tests that hostile strings cost linear time (hang guard only, no timing claims)."""

    @pytest.mark.parametrize("name", sorted(ADVERSARIAL))
    def test_no_backtracking_blowup(self, name):
        """200k characters of a hostile pattern finish well within the hang guard."""
        text = ADVERSARIAL[name]
        start = time.perf_counter()
        scan_leaf(text, key="secret")
        assert time.perf_counter() - start < 2.0

    def test_capped_message(self):
        """A message at the default character cap is scanned within the guard."""
        payload = {"rows": ["a@" * 50_000, "1-" * 50_000, ":" * 100_000, "xoxb-" * 20_000] * 2}
        start = time.perf_counter()
        result = detect_with_status(payload)
        assert time.perf_counter() - start < 2.0
        assert result.truncated is False


def _load(split):
    with (CORPUS / f"{split}.jsonl").open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _leaf(payload, path):
    """Follow a rendered path; the corpus only uses names, indices and quoted keys."""
    from celery_pii._paths import parse_path

    node = payload
    for part in parse_path(path) if path else ():
        node = node[part]
    return node


class TestCorpus:
    """Tests against the labeled corpus (tests/data/detection)."""

    @pytest.mark.parametrize("split", ["dev", "holdout"])
    def test_corpus_is_well_formed(self, split):
        """Ids are unique and every label points at a string leaf."""
        records = _load(split)
        assert len(records) >= 400
        assert len({r["id"] for r in records}) == len(records)
        for rec in records:
            for finding in rec["findings"]:
                assert finding["category"] in CATEGORIES
                assert isinstance(_leaf(rec["payload"], finding["path"]), str), rec["id"]

    @pytest.mark.parametrize("split", ["dev", "holdout"])
    def test_precision_and_recall(self, split):
        """Every category reaches precision >= 0.98 and recall >= 0.97."""
        tp = dict.fromkeys(CATEGORIES, 0)
        fp = dict.fromkeys(CATEGORIES, 0)
        fn = dict.fromkeys(CATEGORIES, 0)
        for rec in _load(split):
            gold = {(f["path"], f["category"]) for f in rec["findings"]}
            got = {(f.path, f.category) for f in detect(rec["payload"])}
            for _, cat in got & gold:
                tp[cat] += 1
            for _, cat in got - gold:
                fp[cat] += 1
            for _, cat in gold - got:
                fn[cat] += 1
        for cat in CATEGORIES:
            assert tp[cat] + fn[cat] >= 40, cat  # enough support to mean something
            assert tp[cat] / (tp[cat] + fp[cat]) >= 0.98, cat
            assert tp[cat] / (tp[cat] + fn[cat]) >= 0.97, cat

    def test_corpus_matches_generator(self):
        """The JSONL files are what generate.py writes (nobody hand-edited them)."""
        script = CORPUS / "generate.py"
        result = subprocess.run(
            [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_places_under_non_string_keys_are_named_as_json_writes_them():
    """{1: card} travels as {"1": card}: the place found is the message's ("1"), not a list index (1)."""
    from celery_pii._detect import locate_with_status

    class Kind(str, enum.Enum):
        CARD = "card"

    document = {
        1: "4111111111111111",
        None: "ann@example.com",
        "x": ["4111111111111111"],
        Kind.CARD: "4111111111111111",
    }
    found, _ = locate_with_status(document)
    assert sorted(found) == [
        (("1",), "credit_card"),
        (("card",), "credit_card"),  # a str Enum key is written as its value, not "Kind.CARD"
        (("null",), "email"),
        (("x", 0), "credit_card"),
    ]
