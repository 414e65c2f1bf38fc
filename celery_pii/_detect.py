"""Automatic PII detection: which string leaves of a payload hold PII.

What counts is specified in ``PII_DETECTION.md``; ``docs/detection.md`` says
how each rule is implemented, what the caps are and how well it scores.
Values decide, not key names, with one exception: a 40-character AWS secret
access key counts only next to a name that says ``secret``.

Cost is part of the contract, because ``pii_detect`` runs on every publish:
each detector sits behind a cheap C-level prefilter (``in``/``count``, or a
regex whose first character is a literal set), every regex is linear
(bounded repetitions, no nested ambiguity, token boundaries checked in Python
after the match), and :func:`detect_with_status` caps the walk (values
visited, characters scanned, nesting depth) and says when it stopped early.

This module does no I/O, imports no Celery and never logs or raises with a
scanned value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final, NamedTuple

from ._paths import format_path, json_key
from ._redact import REDACTED

__all__ = [
    "CATEGORIES",
    "DEFAULT_MAX_CHARS",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_LEAVES",
    "Finding",
    "ScanResult",
    "detect",
    "detect_with_status",
    "scan_leaf",
    "scan_text",
]

CATEGORIES: Final = ("credit_card", "ssn", "email", "phone", "ip_address", "api_key")

#: Values (leaves and containers) one walk visits at most.
DEFAULT_MAX_LEAVES: Final = 100_000
#: Characters of string leaves one walk scans at most (about 1 MB of text).
DEFAULT_MAX_CHARS: Final = 1_000_000
#: Nesting depth of containers one walk enters; equals the longest field path
#: ``_paths`` accepts, so every finding has a path users can write.
DEFAULT_MAX_DEPTH: Final = 64


def _load_phonenumbers() -> ModuleType | None:
    try:
        import phonenumbers  # noqa: PLC0415 - optional extra 'phone'
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return phonenumbers


#: The ``phonenumbers`` module (extra ``phone``) or ``None``.  With it,
#: international numbers must be valid for their country; without it a
#: country-code and length check stands in (see docs/detection.md).  Tests set
#: this to ``None`` to exercise the fallback.
PHONENUMBERS: ModuleType | None = _load_phonenumbers()


@dataclass(frozen=True, slots=True)
class Finding:
    """One category of PII in one string leaf.

    Attributes:
        path: where the leaf is, in the field-path grammar relative to the
            scanned value (``contacts[2].email``); ``""`` when the scanned
            value is itself a string.
        category: one of :data:`CATEGORIES`.
    """

    path: str
    category: str


class ScanResult(NamedTuple):
    """What :func:`detect_with_status` found and whether it saw everything."""

    findings: list[Finding]
    #: ``True`` when a cap stopped the walk: values it did not reach may hold
    #: PII, so callers that refuse or encrypt should assume they do.
    truncated: bool


_CARD, _SSN, _EMAIL, _PHONE, _IP, _KEY = (1 << i for i in range(6))
_BY_MASK: Final = tuple(
    tuple(c for i, c in enumerate(CATEGORIES) if mask >> i & 1) for mask in range(1 << len(CATEGORIES))
)

# ---------------------------------------------------------------------------
# Token boundaries (PII_DETECTION.md "Boundaries"): a match may not touch a
# letter, digit or "_", nor be glued to a larger token by one "." or "-".


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _left_ok(text: str, i: int) -> bool:
    if i == 0:
        return True
    ch = text[i - 1]
    return not (_word(ch) or (ch in ".-" and i > 1 and _word(text[i - 2])))


def _right_ok(text: str, j: int) -> bool:
    if j >= len(text):
        return True
    ch = text[j]
    return not (_word(ch) or (ch in ".-" and j + 1 < len(text) and _word(text[j + 1])))


# ---------------------------------------------------------------------------
# Digit runs: cards, SSNs, phones and IPv4 share one scan.  A run is digit
# groups joined by one connector: a space, "." or "-", or parentheses around
# a group.  Each alternative starts with a different character and "[0-9]+"
# is followed by a non-digit, so the match is linear; the lookahead skips
# runs too short to be anything (7 characters: "1.1.1.1") without leaving C.
# A whole run is then matched against one anchored pattern per format.

_RUN = re.compile(r"[0-9](?=[0-9 .\-()]{6})[0-9]*(?:(?:\)[ .\-]?|[ .\-]\(?|\()[0-9]+)*")
_PAREN_HEAD = re.compile(r"[0-9]{1,4}\)")
_EXT = re.compile(r"(?:x|ext\.?|#)[0-9]{1,6}(?![0-9A-Za-z_])", re.IGNORECASE)
_NOT_DIGITS = str.maketrans("", "", " .-()+")

_CARD_RUN = re.compile(
    r"[0-9]{15,16}|[0-9]{4}([ \-])[0-9]{4}\1[0-9]{4}\1[0-9]{4}|[0-9]{4}([ \-])[0-9]{6}\2[0-9]{5}"
)
_SSN_RUN = re.compile(r"(?!000|666|9)[0-9]{3}(-?)(?!00)[0-9]{2}\1(?!0000)[0-9]{4}")  # SSA validity rules
_NANP = r"[2-9](?!11)[0-9]{2}"  # area code or exchange: 2-9 first, not N11
_US_PHONE = re.compile(
    rf"(?:\+1[ .\-]?|1[ .\-])?(?:\({_NANP}\)[ .\-]?|{_NANP}[ .\-]){_NANP}[ .\-][0-9]{{4}}"
    rf"|\+1 ?{_NANP}{_NANP}[0-9]{{4}}"
)
_INTL_PAREN = re.compile(r"\+[0-9]{1,4}[ .\-]?\(([0-9]{1,4})\)[ .\-]?[0-9][0-9 .\-]*")
_FIRST_GROUP = re.compile(r"[0-9]+")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4_RUN = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")

# ITU-T E.164 country calling codes (inclusive ranges; the set phonenumbers
# 9.0 knows), for the fallback when phonenumbers is not installed.
_COUNTRY_CODE_RANGES: Final = (
    (1, 1), (7, 7), (20, 20), (27, 27), (30, 34), (36, 36), (39, 41), (43, 49), (51, 58), (60, 66),
    (81, 82), (84, 84), (86, 86), (90, 95), (98, 98), (211, 213), (216, 216), (218, 218), (220, 258),
    (260, 269), (290, 291), (297, 299), (350, 359), (370, 378), (380, 383), (385, 387), (389, 389),
    (420, 421), (423, 423), (500, 509), (590, 599), (670, 670), (672, 683), (685, 692), (800, 800),
    (808, 808), (850, 850), (852, 853), (855, 856), (870, 870), (878, 878), (880, 883), (886, 886),
    (888, 888), (960, 968), (970, 977), (979, 979), (992, 996), (998, 998),
)  # fmt: skip
_COUNTRY_CODES: Final = frozenset(
    str(code) for low, high in _COUNTRY_CODE_RANGES for code in range(low, high + 1)
)

_LUHN_DOUBLE = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))


def _luhn(digits: str) -> bool:
    # Byte sums run in C; a per-digit Python loop costs more than the rest
    # of a card check.
    raw = digits.encode("ascii")
    kept = raw[-1::-2]
    return (sum(kept) - 48 * len(kept) + sum(raw[-2::-2].translate(_LUHN_DOUBLE))) % 10 == 0


def _card(digits: str) -> bool:
    if len(digits) == 15:
        branded = digits[:2] in ("34", "37")
    else:
        two, three, four = int(digits[:2]), int(digits[:3]), int(digits[:4])
        branded = (
            digits[0] == "4"
            or 51 <= two <= 55
            or 2221 <= four <= 2720
            or four == 6011
            or 644 <= three <= 649
            or two == 65
        )
    return branded and _luhn(digits)


def _valid_international(digits: str, first_group: str) -> bool:
    """A number after "+" (not NANP): valid for its country."""
    pn = PHONENUMBERS
    if pn is None:
        # Fallback: a known country code written as (the start of) the first
        # group and a national number of at least six digits.
        for size in (1, 2, 3):
            if digits[:size] in _COUNTRY_CODES:
                return first_group.startswith(digits[:size]) and len(digits) - size >= 6
        return False
    for size in (1, 2, 3):
        code = int(digits[:size])
        regions = pn.COUNTRY_CODE_TO_REGION_CODE.get(code)
        if regions:
            break
    else:
        return False
    # Building the number directly and trying the country's main region
    # first costs a fifth of parse() + is_valid_number(); those remain the
    # second opinion (other regions of the code, national prefixes written
    # after it: "+61 (02) ...").
    national = digits[size:]
    number = pn.PhoneNumber(country_code=code, national_number=int(national or "0"))
    if len(national) > 1 and national[0] == "0":
        zeros = len(national) - len(national.lstrip("0"))
        number.italian_leading_zero = True
        number.number_of_leading_zeros = min(zeros, len(national) - 1)
    if pn.is_valid_number_for_region(number, regions[0]) or (len(regions) > 1 and pn.is_valid_number(number)):
        return True
    try:
        return bool(pn.is_valid_number(pn.parse("+" + digits, None)))
    except pn.NumberParseException:
        return False


def _intl_phone(run: str) -> bool:
    """+CC and groups (spaces, dashes or dots), optional "(0)", or E.164."""
    if "(" in run:
        match = _INTL_PAREN.fullmatch(run)
        if match is None:
            return False
        if match.group(1) == "0":  # "+44 (0)20 ...": the trunk prefix is not dialled
            run = run[: match.start(1)] + run[match.end(1) :]
    elif ")" in run:
        return False
    digits = run.translate(_NOT_DIGITS)
    if digits[0] == "1" or not 8 <= len(digits) <= 15:  # +1 follows the US rules only
        return False
    first = _FIRST_GROUP.match(run, 1)
    return first is not None and _valid_international(digits, first.group())


def _classify(run: str) -> int:
    """Categories of one whole run (never of a window inside it)."""
    digits = run.translate(_NOT_DIGITS)
    nd = len(digits)
    found = 0
    if nd in (15, 16):
        if _CARD_RUN.fullmatch(run) and _card(digits):
            found |= _CARD
    elif nd == 9 and _SSN_RUN.fullmatch(run):
        found |= _SSN
    if (run[0] == "+" or nd in (10, 11)) and (
        _US_PHONE.fullmatch(run) or (run[0] == "+" and _intl_phone(run))
    ):
        found |= _PHONE
    elif nd <= 12 and run.count(".") == 3 and _IPV4_RUN.fullmatch(run):
        found |= _IP
    return found


def _scan_runs(text: str) -> int:
    found = 0
    for match in _RUN.finditer(text):
        start, end = match.span()
        if end - start < 7:  # "(1)(1)(1)...": the lookahead let a short run through
            continue
        if start:
            # "+" and "(" are kept out of the pattern so that its first
            # character is a digit (a fast scan); put them back here.
            prev = text[start - 1]
            if prev == "+" or (prev == "(" and _PAREN_HEAD.match(text, start)):
                start -= 1
        left = _left_ok(text, start)
        right = _right_ok(text, end)
        run = text[start:end]
        if left and (right or (text[end] in "xXeE#" and _EXT.match(text, end))):
            whole = _classify(run)
            found |= whole if right else whole & _PHONE  # "415-282-0134x12" is a phone only
            if whole:
                continue
        if " " in run:
            # A run joined by spaces may hold several space-free values
            # ("415-282-0134 415-282-0199"), which must be whole pieces.
            pieces = run.split(" ")
            last = len(pieces) - 1
            for i, piece in enumerate(pieces):
                if len(piece) >= 7 and (i or left) and (i < last or right) and piece[-1].isdigit():
                    found |= _classify(piece)
    return found


# ---------------------------------------------------------------------------
# Email (no token-boundary rule): found from each "@", the local part read
# backwards.  "'", "=" and "`" are legal in a local part but in free text they
# delimit it (key=value, quotes, Markdown code), so they end it here.

_LOCAL_REV = re.compile(r"[\w.!#$%&*+/?^{|}~\-]{1,65}")
_DOT_ATOM = re.compile(r"[^.*]+(?:\.[^.*]+)*")  # no leading, trailing or double dots; "*" is a mask
_ALNUM = re.compile(r"[^\W_]")
_DOMAIN_CHARS = re.compile(r"[\w.\-]{1,256}")
# Labels of letters/digits (Unicode) with inner hyphens; a TLD of two or more
# letters, or punycode.
_DOMAIN = re.compile(r"(?:[^\W_](?:[^\W_]|-)*(?<!-)\.)+(?:[^\W\d_]{2,}|[Xx][Nn]--[A-Za-z0-9\-]*[A-Za-z0-9])")


def _quoted_local(text: str, at: int) -> bool:
    # "john doe"@example.com; the opening quote must start a token.
    open_ = text.rfind('"', max(0, at - 66), at - 1)
    if open_ < 0 or (open_ > 0 and (_word(text[open_ - 1]) or text[open_ - 1] == "\\")):
        return False
    content = text[open_ + 1 : at - 1]
    return bool(content.strip()) and content == content.strip() and not any(c in content for c in "\\\r\n")


def _local_part(text: str, at: int) -> bool:
    if at > 0 and text[at - 1] == '"':
        return _quoted_local(text, at)
    match = _LOCAL_REV.match(text[max(0, at - 65) : at][::-1])
    return (
        match is not None
        and match.end() <= 64
        and _DOT_ATOM.fullmatch(match.group()) is not None
        and _ALNUM.search(match.group()) is not None
    )


def _scan_email(text: str) -> bool:
    at = text.find("@")
    while at >= 0:
        # The domain first: most "@" in payloads (decorators, handles,
        # package specs) fail there, and it is the cheaper half.
        domain = _DOMAIN_CHARS.match(text, at + 1)
        if domain is not None:
            name = domain.group().rstrip(".")  # a full stop ending the sentence
            if "." in name and len(name) <= 253 and _DOMAIN.fullmatch(name) and _local_part(text, at):
                return True
        at = text.find("@", at + 1)
    return False


# ---------------------------------------------------------------------------
# IPv6: hex groups and colons (at most eight groups, optional dotted tail),
# then ipaddress decides.  Times and MAC addresses have neither "::" nor
# enough groups and are dropped before the (slower) parse.

_IPV6 = re.compile(r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.[0-9]{1,3}){0,3}")
_DIGIT = re.compile(r"[0-9]")
_HEX_DIGIT = re.compile(r"[0-9A-Fa-f]")


def _scan_ipv6(text: str) -> bool:
    for match in _IPV6.finditer(text):
        cand = match.group()
        if "::" not in cand and cand.count(":") < 6:
            continue
        start, end = match.span()
        # Not part of a longer hex/colon token (std::vector, a::b::c, MACs).
        if start and text[start - 1] in ":.":
            continue
        if end < len(text) and text[end] == ":":
            continue
        # A bare "::" is a separator in prose ("Title :: Section"), not an address.
        if not (_left_ok(text, start) and _right_ok(text, end) and _HEX_DIGIT.search(cand)):
            continue
        try:
            ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        return True
    return False


# ---------------------------------------------------------------------------
# API keys by format, a PEM private-key header anywhere, and AWS secret access
# keys when a name saying "secret" goes with them.

_API_KEY = re.compile(
    r"(?:AKIA|ASIA)[A-Z0-9]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{36}"
    r"|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}"
    r"|xox[bp](?:-[0-9]{1,20}){1,4}-[A-Za-z0-9]{24,32}"
    r"|[rs]k_live_[A-Za-z0-9]{24,}"
    r"|AIza[A-Za-z0-9_\-]{35}"
    r"|(-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----)"
)
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=_])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=_])")
_SECRET_ASSIGN = re.compile(
    r"secret[a-z0-9_\-]{0,40}[\"']?[ \t]{0,4}[=:][ \t]{0,4}[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=_])",
    re.IGNORECASE,
)
_KEY_SEPARATOR = re.compile("[-_]")
_UPPER, _LOWER = re.compile("[A-Z]"), re.compile("[a-z]")


def _scan_keys(text: str) -> bool:
    for match in _API_KEY.finditer(text):
        if match.group(1):
            return True
        start, end = match.span()
        if not (_left_ok(text, start) and _right_ok(text, end)):
            continue
        key = match.group()
        body = key[4:] if key[:4] in ("AKIA", "ASIA", "AIza") else _KEY_SEPARATOR.split(key)[-1]
        if len(set(body)) >= 6:  # ghp_XXXX..., AKIAXXXX...: placeholders, not keys
            return True
    return False


def _mixed(candidate: str) -> bool:
    return bool(_UPPER.search(candidate) and _LOWER.search(candidate) and _DIGIT.search(candidate))


def _secret_context(key: object, parent: object) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    if "secret" in lowered:
        return True
    if lowered == "value" and isinstance(parent, dict):
        # [{"name": "AWS_SECRET_ACCESS_KEY", "value": ...}] (ECS, Kubernetes;
        # CloudFormation spells them Name/Value)
        name = parent.get("name", parent.get("Name"))
        return isinstance(name, str) and "secret" in name.lower()
    return False


def _scan_secret(text: str, key: object, parent: object) -> bool:
    if ("=" in text or ":" in text) and ("ecret" in text or "ECRET" in text):
        for match in _SECRET_ASSIGN.finditer(text):
            if _mixed(match.group(1)):
                return True
    if _secret_context(key, parent):
        return any(_mixed(m.group()) for m in _AWS_SECRET.finditer(text))
    return False


# ---------------------------------------------------------------------------


def _has_digit(text: str) -> bool:
    # Ten memchr calls beat one regex scan by an order of magnitude.
    return (
        "0" in text
        or "1" in text
        or "2" in text
        or "3" in text
        or "4" in text
        or "5" in text
        or "6" in text
        or "7" in text
        or "8" in text
        or "9" in text
    )


def _may_hold_key(text: str) -> bool:
    # Single-character membership is a memchr; longer needles only run when
    # their first gate passes.
    return (
        ("A" in text and ("AKIA" in text or "ASIA" in text or "AIza" in text))
        or ("_" in text and ("_live_" in text or "gh" in text or "github_pat_" in text))
        or ("-" in text and ("xox" in text or "-----BEGIN" in text))
    )


def _scan(text: str, key: object = None, parent: object = None) -> int:
    """Bit mask (bit i = ``CATEGORIES[i]``) of the PII in one string leaf."""
    n = len(text)
    if n < 3:
        return 0
    found = 0
    if n >= 7 and _has_digit(text):
        found = _scan_runs(text)
    if "@" in text and _scan_email(text):
        found |= _EMAIL
    if ":" in text and not found & _IP and ("::" in text or text.count(":") >= 6) and _scan_ipv6(text):
        found |= _IP
    if n >= 20 and (
        (_may_hold_key(text) and _scan_keys(text)) or (n >= 40 and _scan_secret(text, key, parent))
    ):
        found |= _KEY
    return found


def scan_text(text: str) -> set[str]:
    """Categories of PII in one string.

    The AWS secret-key rule applies only through text context here
    (``aws_secret_access_key = ...``); use :func:`scan_leaf` to pass the
    leaf's key name and parent dict as well.

    Arguments:
        text: the string to scan; it is never logged or kept.

    Returns:
        The categories found (a subset of :data:`CATEGORIES`).
    """
    return set(_BY_MASK[_scan(text)])


def scan_leaf(text: str, *, key: str | int | None = None, parent: object = None) -> set[str]:
    """Categories of PII in one string leaf, knowing where it sits.

    Arguments:
        text: the leaf.
        key: its dict key (or list index); a key containing ``secret``
            makes a 40-character AWS-secret-shaped value count.
        parent: the dict holding it; ``{"name": "...SECRET...", "value":
            leaf}`` (environment-variable lists) makes it count too.

    Returns:
        The categories found (a subset of :data:`CATEGORIES`).
    """
    return set(_BY_MASK[_scan(text, key, parent)])


def _children(value: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> Iterator[tuple[Any, Any]]:
    if not isinstance(value, dict):
        return enumerate(value)
    # Dict keys as JSON writes them ({1: ...} -> "1"): the places found are the message's,
    # where the worker opens them; an int in a location is a list index, nothing else.
    return ((key if type(key) is str else (json_key(key) or str(key)), child) for key, child in value.items())


def _parts(node: tuple[Any, Any] | None, key: object) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    while True:
        parts.append(key if isinstance(key, (str, int)) and not isinstance(key, bool) else str(key))
        if node is None:
            break
        node, key = node
    parts.reverse()
    return tuple(parts)


def shown_path(location: Sequence[str | int]) -> str:
    """``location`` as a field path for logs, errors and the CLI; keys that look like PII show as REDACTED.

    Dict keys are the caller's data and detection never treats them as PII
    (docs/detection.md): an email or a card number used as a key would
    otherwise be printed by the very report that keeps the value it names out.
    """
    return format_path([REDACTED if isinstance(part, str) and scan_text(part) else part for part in location])


#: Where PII was found, as path parts (``()``: the value itself), and its category.
Located = tuple[tuple[str | int, ...], str]


def detect_with_status(
    value: object,
    *,
    max_leaves: int = DEFAULT_MAX_LEAVES,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> ScanResult:
    """Find PII in a JSON-like value and say whether the scan was complete.

    Walks dicts, lists and tuples depth first (dict order, then index order)
    without recursion; scans every string leaf; ignores other leaves and
    dict keys.  One :class:`Finding` per (leaf, category), in walk order and
    then :data:`CATEGORIES` order.

    Arguments:
        value: the value; when it is a string its path is ``""``.
        max_leaves: values (leaves and containers) to visit at most; past it
            the walk stops.
        max_chars: characters of string leaves to scan at most; the walk
            stops before a leaf that would exceed it.
        max_depth: containers to nest at most (the root is depth 1); deeper
            containers are skipped and the walk goes on with their siblings.

    Returns:
        The findings and ``truncated=True`` if any cap was hit.

    Raises:
        ValueError: a cap is not a positive integer.
    """
    located, truncated = locate_with_status(
        value, max_leaves=max_leaves, max_chars=max_chars, max_depth=max_depth
    )
    return ScanResult([Finding(format_path(parts), category) for parts, category in located], truncated)


def locate_with_status(
    value: object,
    *,
    max_leaves: int = DEFAULT_MAX_LEAVES,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> tuple[list[Located], bool]:
    """:func:`detect_with_status` with each finding's place as path parts, not text.

    For callers that go on to use the place (seal it, print it redacted):
    a rendered path read back could fail where a long key makes it longer
    than field paths may be.

    Raises:
        ValueError: a cap is not a positive integer.
    """
    for name, cap in (("max_leaves", max_leaves), ("max_chars", max_chars), ("max_depth", max_depth)):
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            msg = f"{name} must be a positive integer"
            raise ValueError(msg)
    if isinstance(value, str):
        if len(value) > max_chars:
            return [], True
        return [((), c) for c in _BY_MASK[_scan(value)]], False
    if isinstance(value, (dict, list, tuple)):
        return _walk(value, max_leaves, max_chars, max_depth)
    return [], False


def _walk(
    root: dict[Any, Any] | list[Any] | tuple[Any, ...], max_leaves: int, max_chars: int, max_depth: int
) -> tuple[list[Located], bool]:
    findings: list[Located] = []
    visited = chars = 0
    skipped = False  # a container deeper than max_depth was left out
    # Each frame: the children still to visit, the path node (parent node,
    # key) of the container, and the container itself (the AWS rule needs it).
    stack: list[tuple[Iterator[tuple[Any, Any]], tuple[Any, Any] | None, Any]] = [
        (_children(root), None, root)
    ]
    while stack:
        children, node, container = stack[-1]
        for key, child in children:
            visited += 1
            if visited > max_leaves:
                return findings, True
            if isinstance(child, str):
                chars += len(child)
                if chars > max_chars:
                    return findings, True
                mask = _scan(child, key, container)
                if mask:
                    parts = _parts(node, key)
                    findings.extend((parts, c) for c in _BY_MASK[mask])
            elif isinstance(child, (dict, list, tuple)):
                if len(stack) >= max_depth:
                    skipped = True
                else:
                    stack.append((_children(child), (node, key), child))
                    break  # descend; this frame resumes where it stopped
        else:
            stack.pop()
    return findings, skipped


def detect(
    value: object,
    *,
    max_leaves: int = DEFAULT_MAX_LEAVES,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> list[Finding]:
    """Find PII in a JSON-like value (see :func:`detect_with_status`).

    A truncated scan returns what it found so far; callers that must treat
    an incomplete scan conservatively use :func:`detect_with_status`.

    Arguments:
        value: a dict, list, tuple or string (other values have no findings).
        max_leaves: values to visit at most (see :func:`detect_with_status`).
        max_chars: characters to scan at most.
        max_depth: containers to nest at most.

    Returns:
        One :class:`Finding` per (string leaf, category).

    Raises:
        ValueError: a cap is not a positive integer.
    """
    return detect_with_status(value, max_leaves=max_leaves, max_chars=max_chars, max_depth=max_depth).findings
