"""Tests for celery_pii._paths."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_pii._paths import (
    WILDCARD,
    AmbiguousKey,
    Binder,
    format_path,
    get_at,
    parse_path,
    replace_in_copies,
    set_all_in_place,
    set_in_place,
)
from celery_pii.exceptions import ConfigurationError


class TestGrammar:
    """Tests for parse_path and format_path."""

    @pytest.mark.parametrize(
        ("text", "parts"),
        [
            ("card_number", ("card_number",)),
            ("customer.email", ("customer", "email")),
            ("items[*].serial", ("items", WILDCARD, "serial")),
            ("rows[3][1]", ("rows", 3, 1)),
            ('headers["x.y z"].v', ("headers", "x.y z", "v")),
            ("x-request-id", ("x-request-id",)),
            ("[0].email", (0, "email")),
        ],
    )
    def test_parse(self, text, parts):
        """Names, indices, wildcards and quoted keys parse into parts."""
        assert parse_path(text) == parts

    @pytest.mark.parametrize(
        "text",
        [
            "",
            ".a",
            "a.",
            "a..b",
            "a[",
            "a[x]",
            "a[-1]",
            "a[01]",
            "a b",
            "a.[0]",
            '["unterminated]',
            "1abc",
            "a" * 2000,
            ".".join(["a"] * 100),
        ],
    )
    def test_malformed_names_task_and_path(self, text):
        """A malformed path raises ConfigurationError naming the task and the path."""
        with pytest.raises(ConfigurationError) as info:
            parse_path(text, task="shop.charge")
        assert "shop.charge" in str(info.value)
        assert "malformed field path" in str(info.value)

    def test_non_string(self):
        """A path that is not a string is refused."""
        with pytest.raises(ConfigurationError, match="must be strings"):
            parse_path(3, task="t")  # type: ignore[arg-type]

    @settings(max_examples=300)
    @given(
        st.lists(
            st.one_of(
                st.text(min_size=1, max_size=10), st.integers(min_value=0, max_value=10**6), st.just(WILDCARD)
            ),
            min_size=1,
            max_size=8,
        )
    )
    def test_format_then_parse_is_identity(self, parts):
        """Any parts render to a path that parses back to the same parts."""
        assert parse_path(format_path(parts)) == tuple(parts)


def charge(card_number, amount, customer=None, *extra, items=(), **options):
    """A task function with every kind of parameter."""


class TestBinder:
    """Tests for binding declared paths to a call."""

    def _locate(self, fields, args, kwargs):
        return list(Binder(charge, fields, task="t").locate(args, kwargs))

    def test_positional_and_keyword_give_the_same_field(self):
        """card_number is found whether passed by position or by name."""
        assert self._locate(["card_number"], ("4111", 5), {}) == [(("args", 0), "4111")]
        assert self._locate(["card_number"], (), {"card_number": "4111"}) == [
            (("kwargs", "card_number"), "4111")
        ]

    def test_nested_and_wildcards(self):
        """Dict keys, list indices and [*] resolve to concrete locations."""
        items = [{"serial": "a"}, {"serial": "b"}, {"other": 1}]
        found = self._locate(
            ["customer.email", "items[*].serial", "items[1]"], (1, 2, {"email": "e"}), {"items": items}
        )
        # items[1].serial lies inside items[1], which is sealed whole: it is not located twice.
        assert found == [
            (("args", 2, "email"), "e"),
            (("kwargs", "items", 0, "serial"), "a"),
            (("kwargs", "items", 1), {"serial": "b"}),
        ]

    @pytest.mark.parametrize(
        "fields",
        [
            ["customer", "customer.email"],
            ["customer.email", "customer"],
            ["customer", "customer"],
            ["items[*].serial", "items[*]"],
            ["items[1]", "items[*].serial"],
            ["items[*].serial", "items[1]"],
        ],
    )
    def test_values_inside_other_declared_values_are_not_located_again(self, fields):
        """Overlapping paths locate the outer value only: sealing it seals what lies inside.

        Locating both put a value inside one already sealed, which failed to
        seal or, the other way round, to open.
        """
        items = [{"serial": "a"}, {"serial": "b"}]
        found = self._locate(fields, (1, 2, {"email": "e"}), {"items": items})
        locations = [location for location, _ in found]
        assert len(set(locations)) == len(locations)
        for location in locations:
            assert not any(location[:end] in locations for end in range(1, len(location)))
        sealed = replace_in_copies(
            {"args": [1, 2, {"email": "e"}], "kwargs": {"items": items}}, locations, "M"
        )
        for location, value in found:
            set_in_place(sealed, location, value)
        assert sealed == {"args": [1, 2, {"email": "e"}], "kwargs": {"items": items}}

    def test_absent_paths_are_fine(self):
        """A declared path missing from the call yields nothing: no argument, a None, no such key or index."""
        fields = ["customer.email", "customer.address.zip", "items[5]", "items[*].x"]
        assert self._locate(fields, (1, 2), {}) == []
        assert self._locate(fields, (1, 2, None), {"items": None}) == []
        assert self._locate(fields, (1, 2, {"address": None}), {"items": [{"y": 1}, None]}) == []
        assert self._locate(fields, (1, 2, {"tier": "gold"}), {"items": []}) == []

    @pytest.mark.parametrize("simple", [True, False], ids=["simple-walk", "general-walk"])
    def test_a_value_of_another_shape_on_the_way_is_found_whole(self, simple):
        """Where a path goes into a dict or a list and meets a text, a list or a number, that value is sealed.

        The caller passed the customer as JSON text, or as a namedtuple (which
        JSON writes as a list): the email was "absent" and went out in plaintext.
        """
        email = "ann@example.com"
        fields = (
            ["customer.email", "customer.name"] if simple else ["customer.email", "items[*].x", "items[0]"]
        )
        binder = Binder(charge, fields, task="t")
        assert binder.simple is simple
        as_text, as_list = f'{{"email": "{email}"}}', [email, "Ann"]
        assert binder.locate((1, 2, as_text), {}) == [(("args", 2), as_text)]  # once, for both paths
        assert binder.locate((1, 2), {"customer": as_list}) == [(("kwargs", "customer"), as_list)]
        deeper = Binder(charge, ["customer.address.zip"], task="t")
        assert deeper.locate((1, 2, {"address": "9 Elm St, 90210"}), {}) == [
            (("args", 2, "address"), "9 Elm St, 90210")
        ]
        if simple:
            marked = binder.mark_simple((1, 2, as_text), {}, "M")
            assert marked[:3] == ([("args", 2)], [as_text], [1, 2, "M"])
        else:
            assert binder.locate((1, 2), {"items": {"x": email}}) == [(("kwargs", "items"), {"x": email})]
            assert binder.locate((1, 2), {"items": [{"x": 1}, "4111 1111 1111 1111"]}) == [
                (("kwargs", "items", 1), "4111 1111 1111 1111"),
                (("kwargs", "items", 0), {"x": 1}),
            ]

    def test_a_subject_path_meeting_another_shape_finds_nothing(self):
        """A data subject's id is one value: a text where its path goes into a dict is not taken for it."""
        subject = Binder(charge, ["customer.id"], task="t", sealing=False)
        assert subject.locate((1, 2, '{"id": "user-42"}'), {}) == []
        assert subject.locate((1, 2, {"id": "user-42"}), {}) == [(("args", 2, "id"), "user-42")]

    def test_var_positional_and_var_keyword(self):
        """*extra elements and **options keys are addressable by their parameter names."""
        found = self._locate(
            ["extra[1]", "options.token", "ssn"], (1, 2, 3, "x", "y"), {"token": "t", "ssn": "s"}
        )
        assert found == [(("args", 4), "y"), (("kwargs", "token"), "t"), (("kwargs", "ssn"), "s")]
        assert self._locate(["extra"], (1, 2, 3, "x", "y"), {}) == [(("args", 3), "x"), (("args", 4), "y")]

    def test_a_name_the_signature_lacks_seals_every_extra_positional_argument(self):
        """A field that may have come by position into ``*args`` is never left out.

        A decorator without ``functools.wraps`` leaves the task function as
        ``(*args, **kwargs)``: ``charge.delay("4111...", 10)`` then gives no
        name to the card, and the field was "absent", published in plaintext.
        """

        def wrapper(*args, **kwargs):
            """What a decorator without functools.wraps leaves."""

        binder = Binder(wrapper, ["card", "customer.email"], task="t")
        assert not binder.simple
        card, email = "4111 1111 1111 1111", "ann@example.com"
        assert binder.locate((card, 10, {"email": email}), {}) == [
            (("args", 0), card),
            (("args", 1), 10),
            (("args", 2), {"email": email}),
        ]
        # Given by name, the field is found where it is, and nothing else is sealed.
        assert binder.locate((10,), {"card": card}) == [(("kwargs", "card"), card), (("args", 0), 10)]
        assert Binder(wrapper, ["card"], task="t").locate((10,), {"card": card}) == [
            (("kwargs", "card"), card)
        ]
        # Beside named parameters, only the positional arguments past them are in doubt.
        assert self._locate(["ssn"], (1, 2, 3, "900-12-3456"), {}) == [(("args", 3), "900-12-3456")]
        assert self._locate(["ssn"], (1, 2, 3), {}) == []

    def test_a_subject_the_signature_lacks_is_never_guessed_by_position(self):
        """A data subject's id must be one value: given by position to ``(*args, **kwargs)`` it is absent."""

        def wrapper(*args, **kwargs):
            """What a decorator without functools.wraps leaves."""

        subject = Binder(wrapper, ["user_id"], task="t", sealing=False)
        assert subject.locate(("ann@example.com", "user-42"), {}) == []
        assert subject.locate(("ann@example.com",), {"user_id": "user-42"}) == [
            (("kwargs", "user_id"), "user-42")
        ]

    def test_a_name_the_signature_lacks_beside_only_kwargs_comes_by_name(self):
        """Without ``*args`` such a field can only be a keyword: the binder stays simple."""

        def options_only(a, **options):
            """No *args."""

        binder = Binder(options_only, ["token"], task="t")
        assert binder.simple
        assert binder.locate((1,), {"token": "t"}) == [(("kwargs", "token"), "t")]
        assert binder.locate((1,), {}) == []

    def test_bound_task_self_is_skipped(self):
        """A bound method's self is not a parameter to bind."""

        class Task:
            def run(self, ssn):
                """Bound run."""

        assert list(Binder(Task().run, ["ssn"], task="t").locate(("s",), {})) == [(("args", 0), "s")]

    def test_unknown_parameter_is_an_error_at_registration(self):
        """A path naming no parameter of a function without **kwargs is refused with task and path."""

        def plain(a, b):
            """No **kwargs."""

        with pytest.raises(ConfigurationError, match=r"'t\.x'.*'c\.d'"):
            Binder(plain, ["c.d"], task="t.x")

    def test_path_must_start_with_a_name(self):
        """A path starting with an index is not a parameter path."""
        with pytest.raises(ConfigurationError):
            Binder(charge, ["[0]"], task="t")

    def test_display_uses_parameter_names(self):
        """Locations render as parameter paths for messages and reprs."""
        binder = Binder(charge, ["card_number"], task="t")
        assert binder.display(("args", 0)) == "card_number"
        assert binder.display(("args", 2, "email")) == "customer.email"
        assert binder.display(("args", 4)) == "extra[1]"
        assert binder.display(("kwargs", "items", 0)) == "items[0]"

    @settings(max_examples=200)
    @given(
        card=st.text(), amount=st.integers(), by_name=st.booleans(), emails=st.lists(st.text(), max_size=4)
    )
    def test_binding_finds_each_value_once(self, card, amount, by_name, emails):
        """Property: every declared value present is located exactly once, at a location holding it."""
        customer = {"contacts": [{"email": e} for e in emails]}
        args, kwargs = (
            ((), {"card_number": card, "amount": amount, "customer": customer})
            if by_name
            else ((card, amount, customer), {})
        )
        found = self._locate(["card_number", "customer.contacts[*].email"], args, kwargs)
        assert [value for _, value in found] == [card, *emails]
        for location, value in found:
            assert get_at({"args": args, "kwargs": kwargs}, location) == value


MARK = "[sealed]"
_KEYS = st.sampled_from(["email", "address", "city", "tier"])
_SIMPLE_VALUES = st.recursive(
    st.text(max_size=3) | st.integers() | st.just(MARK) | st.none(),
    lambda inner: st.dictionaries(_KEYS, inner, max_size=3) | st.lists(inner, max_size=2),
    max_leaves=8,
)
_SIMPLE_FIELDS = ["card_number", "amount", "customer", "customer.email", "customer.address.city", "items"]


@settings(max_examples=300)
@given(
    fields=st.lists(st.sampled_from(_SIMPLE_FIELDS), min_size=1, unique=True),
    values=st.fixed_dictionaries(
        dict.fromkeys(("card_number", "amount", "customer", "items"), _SIMPLE_VALUES)
    ),
    positional=st.integers(min_value=0, max_value=3),
    as_tuple=st.booleans(),
)
def test_mark_simple_is_locate_then_replace(fields, values, positional, as_tuple):
    """Property: the one-walk sealing of simple paths equals locating, then replacing in copies.

    Same locations, same values, same marked copies, markers left alone, and
    the caller's objects untouched.
    """
    binder = Binder(charge, fields, task="t")
    assert binder.simple
    names = ["card_number", "amount", "customer"]
    args_list = [values[name] for name in names[:positional]]
    args = tuple(args_list) if as_tuple else args_list
    kwargs = {name: values[name] for name in names[positional:]} | {"items": values["items"]}
    before = copy.deepcopy((args, kwargs))

    locations, found, new_args, new_kwargs = binder.mark_simple(args, kwargs, MARK)

    # The general walk is the oracle: the same fields plus a path no call here reaches
    # (``extra`` collects positional arguments past the third) make the binder not simple.
    general = Binder(charge, [*fields, "extra[5]"], task="t")
    assert not general.simple
    expected_at, expected = general.locate_apart(args, kwargs)
    kept = [i for i, value in enumerate(expected) if not (isinstance(value, str) and value == MARK)]
    assert locations == [expected_at[i] for i in kept]
    assert found == [expected[i] for i in kept]
    marked = replace_in_copies({"args": args, "kwargs": kwargs}, locations, MARK)
    assert {"args": new_args, "kwargs": new_kwargs} == marked
    assert (args, kwargs) == before
    assert (new_args is args) == all(location[0] != "args" for location in locations)
    assert (new_kwargs is kwargs) == all(location[0] != "kwargs" for location in locations)


def test_mark_simple_refuses_a_binder_with_other_paths():
    """Marking only the simple paths of a binder with a wildcard or index would leave those unsealed."""
    binder = Binder(charge, ["card_number", "items[*].serial"], task="t")
    assert not binder.simple
    with pytest.raises(ValueError, match=r"items\[\*\]\.serial"):
        binder.mark_simple(("4111",), {"items": [{"serial": "s"}]}, MARK)


class TestCopies:
    """Tests for replace_in_copies and set_in_place."""

    def test_caller_objects_are_untouched(self):
        """Replacing nested values copies only the path; the caller's dicts and lists stay as they were."""
        customer = {"email": "ann@example.com", "tier": "gold", "tags": ["a"]}
        args, kwargs = ("4111", customer), {"items": [{"serial": "s1"}, {"serial": "s2"}]}
        root = {"args": args, "kwargs": kwargs, "chain": None}
        new = replace_in_copies(
            root, [("args", 0), ("args", 1, "email"), ("kwargs", "items", 1, "serial")], "X"
        )
        assert new["args"] == ["X", {"email": "X", "tier": "gold", "tags": ["a"]}]
        assert new["kwargs"] == {"items": [{"serial": "s1"}, {"serial": "X"}]}
        assert new["chain"] is None
        assert customer["email"] == "ann@example.com"
        assert kwargs["items"][1]["serial"] == "s2"
        assert args[0] == "4111"
        assert new["args"][1]["tags"] is customer["tags"]  # untouched branches are shared, not copied

    def test_shared_containers_are_copied_per_place(self):
        """One dict passed twice: replacing in the first place leaves the second (and the caller's) alone."""
        customer = {"email": "ann@example.com"}
        root = {"args": [customer, customer], "kwargs": {}}
        new = replace_in_copies(root, [("args", 0, "email"), ("args", 0, "tier")], "X")
        assert new["args"] == [{"email": "X", "tier": "X"}, {"email": "ann@example.com"}]
        assert new["args"][1] is customer
        assert customer == {"email": "ann@example.com"}

    def test_set_in_place(self):
        """Opening writes into the worker's own decoded objects."""
        args, kwargs = ["X", {"email": "Y"}], {"items": [{"serial": "Z"}]}
        root = {"args": args, "kwargs": kwargs}
        set_in_place(root, ("args", 1, "email"), "ann@example.com")
        set_in_place(root, ("kwargs", "items", 0, "serial"), "s")
        set_in_place(root, ("args", 0), "4111")
        assert args == ["4111", {"email": "ann@example.com"}]
        assert kwargs == {"items": [{"serial": "s"}]}

    def test_set_all_in_place_writes_nothing_when_a_place_is_missing(self):
        """All or nothing: a missing later place leaves the earlier ones as they were."""
        args, kwargs = ["[pii:sealed]", {"tier": "gold"}], {}
        root = {"args": args, "kwargs": kwargs}
        with pytest.raises(KeyError):
            set_all_in_place(root, (("args", 0), ("args", 1, "email")), ("4111", "ann@example.com"))
        assert args == ["[pii:sealed]", {"tier": "gold"}]
        with pytest.raises(IndexError):
            set_all_in_place(root, (("args", 0), ("args", 2)), ("4111", "x"))
        assert args[0] == "[pii:sealed]"

    @pytest.mark.parametrize(
        "location", [("args", 5), ("kwargs", "nope"), ("kwargs", "items", 0, "x"), ("chain", 0)]
    )
    def test_set_in_place_never_creates(self, location):
        """A location that does not exist raises instead of growing the data."""
        root = {"args": ["a"], "kwargs": {"items": [{"serial": "s"}]}, "chain": None}
        with pytest.raises((KeyError, IndexError, TypeError)):
            set_in_place(root, location, "v")


class TestNonStringKeys:
    """A caller's dict with non-str keys is what JSON makes it: {1: v} travels as {"1": v}.

    A path naming the JSON key (``customer["1"]``) must find the value before
    JSON does, or it would leave unsealed; the marker must replace it, not sit
    beside it (JSON would write both).
    """

    CARD = "4111111111111111"

    @pytest.mark.parametrize(
        ("key", "written"), [(1, "1"), (True, "true"), (None, "null"), (1.5, "1.5")], ids=repr
    )
    def test_a_simple_path_finds_and_replaces_the_value_json_writes_there(self, key, written):
        binder = Binder(charge, [f'customer["{written}"]'], task="t")
        assert binder.simple
        customer = {key: self.CARD, "tier": "gold"}
        locations, values, new_args, _ = binder.mark_simple(("c", 1, customer), {}, MARK)
        assert (locations, values) == ([("args", 2, written)], [self.CARD])
        assert new_args[2] == {written: MARK, "tier": "gold"}  # the key as JSON has it, in its place
        assert self.CARD not in json.dumps(list(new_args))
        assert customer == {key: self.CARD, "tier": "gold"}  # the caller's dict is untouched

    def test_a_general_path_finds_and_replaces_it_too(self):
        binder = Binder(charge, ['items[*]["7"]'], task="t")
        items = [{7: self.CARD}, {"7": "ann@example.com"}, {8: "x"}]
        root = {"args": ("c", 1), "kwargs": {"items": items}}
        located = binder.locate(root["args"], root["kwargs"])
        assert located == [
            (("kwargs", "items", 0, "7"), self.CARD),
            (("kwargs", "items", 1, "7"), "ann@example.com"),
        ]
        sealed = replace_in_copies(root, [location for location, _ in located], MARK)
        assert sealed["kwargs"]["items"][:2] == [{"7": MARK}, {"7": MARK}]
        assert self.CARD not in json.dumps(sealed)
        assert get_at(root, ("kwargs", "items", 0, "7")) == self.CARD

    @pytest.mark.parametrize(
        ("customer", "written"),
        [
            ({1: CARD, "1": "gold"}, "1"),
            ({"true": "gold", True: CARD}, "true"),
            ({float("nan"): CARD, float("nan"): "gold"}, "NaN"),  # two keys: NaN is not equal to itself
        ],
        ids=["int-and-str", "bool-and-str", "two-nans"],
    )
    def test_sealing_refuses_two_keys_json_writes_alike(self, customer, written):
        """{1: card, "1": x}: JSON writes "1" twice, and only one value could be sealed.

        The path found the str key's value and the marker replaced it: the
        card under the int key went to the broker in plaintext.
        """
        binder = Binder(charge, [f'customer["{written}"]'], task="t")
        with pytest.raises(AmbiguousKey) as raised:
            binder.mark_simple(("c", 1, customer), {}, MARK)
        assert raised.value.location == ("args", 2, written)
        with pytest.raises(AmbiguousKey) as raised:
            replace_in_copies({"args": ["c", 1, customer]}, [("args", 2, written)], MARK, sealing=True)
        assert raised.value.location == ("args", 2, written)

    def test_sealing_refuses_them_on_the_way_to_a_value(self):
        binder = Binder(charge, ['customer["1"].email'], task="t")
        customer = {"1": {"email": "ann@example.com"}, 1: {"email": self.CARD}}
        with pytest.raises(AmbiguousKey) as raised:
            binder.mark_simple(("c", 1, customer), {}, MARK)
        assert raised.value.location == ("args", 2, "1", "email")

    def test_a_copy_made_to_hide_values_keeps_one_key_holding_the_marker(self):
        """Outside sealing (hiding opened values in stored arguments), no value of the text stays."""
        customer = {float("nan"): self.CARD, "tier": "gold", float("nan"): "ann@example.com"}
        hidden = replace_in_copies({"args": ["c", 1, customer]}, [("args", 2, "NaN")], MARK)
        assert hidden["args"][2] == {"NaN": MARK, "tier": "gold"}
        mixed = {1: self.CARD, "1": "ann@example.com"}
        assert replace_in_copies({"kwargs": {"customer": mixed}}, [("kwargs", "customer", "1")], MARK) == {
            "kwargs": {"customer": {"1": MARK}}
        }
        assert len(customer) == 3 and len(mixed) == 2  # the caller's dicts are untouched
