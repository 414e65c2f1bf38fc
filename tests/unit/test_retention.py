"""Tests for RetentionPolicy."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from celery_pii import RetentionPolicy
from celery_pii._retention import IMMEDIATE_GRACE, bucket_deadline
from celery_pii.exceptions import ConfigurationError

NOW = datetime(2026, 11, 28, 12, 34, 56, 789000, tzinfo=timezone.utc)


class TestConstruction:
    """Tests for building policies."""

    @pytest.mark.parametrize(
        "bad",
        [
            timedelta(0),
            timedelta(seconds=-1),
            timedelta(microseconds=1),
            timedelta(milliseconds=999),
            30,
            None,
        ],
    )
    def test_delete_after_needs_a_timedelta_of_a_second_or_more(self, bad):
        """Zero, negative, sub-second or non-timedelta durations are refused.

        A deadline falls on a whole second and nothing is sealed past it: a
        1 µs policy refused every publish, a 0.5 s one about half of them.
        """
        with pytest.raises(ConfigurationError, match="at least 1 second"):
            RetentionPolicy.delete_after(bad)

    @pytest.mark.parametrize(
        "offset", [timedelta(0), timedelta(microseconds=1), timedelta(microseconds=999_999)]
    )
    def test_the_shortest_policy_leaves_a_deadline_ahead_at_any_moment(self, offset):
        """One second from any moment (a whole second or just before the next) ends after that moment."""
        now = datetime(2026, 11, 28, 12, 34, 56, tzinfo=timezone.utc) + offset
        bucket = RetentionPolicy.delete_after(timedelta(seconds=1)).bucket(now)
        assert bucket is not None
        assert now < bucket <= now + timedelta(seconds=1)

    @pytest.mark.parametrize("too_long", [timedelta.max, timedelta(days=36526)])
    def test_delete_after_is_at_most_100_years(self, too_long):
        """A duration whose deadline would overflow (or mean never) is a ConfigurationError."""
        with pytest.raises(ConfigurationError, match="at most 100 years"):
            RetentionPolicy.delete_after(too_long)
        assert RetentionPolicy.delete_after(timedelta(days=36525)).bucket(NOW) is not None

    def test_delete_at_needs_aware_datetime(self):
        """A naive datetime is refused."""
        with pytest.raises(ConfigurationError, match="timezone-aware"):
            RetentionPolicy.delete_at(datetime(2030, 1, 1))  # noqa: DTZ001

    @pytest.mark.parametrize(
        "policy",
        [
            RetentionPolicy.delete_after(timedelta(days=30)),
            RetentionPolicy.delete_at(datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=2)))),
            RetentionPolicy.keep_indefinitely(),
            RetentionPolicy.delete_immediately(),
            RetentionPolicy.use_default(),
        ],
    )
    def test_serializable(self, policy):
        """to_dict/from_dict round-trip every policy, and the repr names the constructor."""
        assert RetentionPolicy.from_dict(policy.to_dict()) == policy
        assert repr(policy).startswith(f"RetentionPolicy.{policy.name}(")

    @pytest.mark.parametrize(
        "written",
        [
            "2030-01-01T00:00:00Z",
            "2030-01-01T00:00:00+0000",
            "2030-01-01T00:00:00.5+00:00",
            "20300101T000000Z",
        ],
    )
    def test_from_dict_reads_every_form_of_iso_8601(self, written):
        """Python 3.10's fromisoformat read only what isoformat() writes: data written elsewhere was refused."""
        policy = RetentionPolicy.from_dict({"policy": "delete_at", "at": written})
        assert policy.moment is not None
        assert abs(policy.moment - datetime(2030, 1, 1, tzinfo=timezone.utc)) <= timedelta(seconds=1)

    def test_from_dict_rejects_nonsense(self):
        """Unknown or incomplete data is a ConfigurationError."""
        for data in (
            {},
            {"policy": "forever"},
            {"policy": "delete_after"},
            {"policy": "delete_after", "seconds": -5},
            {"policy": "delete_after", "seconds": float("inf")},
            {"policy": "delete_after", "seconds": float("nan")},
            {"policy": "delete_after", "seconds": 1e300},
            {"policy": "delete_after", "seconds": timedelta.max.total_seconds()},
            {"policy": "delete_at", "at": "next tuesday"},
        ):
            with pytest.raises(ConfigurationError):
                RetentionPolicy.from_dict(data)

    def test_use_default_resolves(self):
        """use_default() resolves to the given default; other policies stay."""
        default = RetentionPolicy.delete_after(timedelta(days=1))
        assert RetentionPolicy.use_default().resolve(default) is default
        kept = RetentionPolicy.keep_indefinitely()
        assert kept.resolve(default) is kept
        with pytest.raises(ConfigurationError):
            RetentionPolicy.use_default().bucket(NOW)


class TestBuckets:
    """Tests for deadlines and buckets."""

    def test_indefinite_has_no_bucket(self):
        """keep_indefinitely() never expires."""
        assert RetentionPolicy.keep_indefinitely().bucket(NOW) is None

    @pytest.mark.parametrize(
        ("duration", "step"),
        [
            (timedelta(seconds=5), timedelta(seconds=1)),
            (timedelta(minutes=30), timedelta(minutes=1)),
            (timedelta(days=1), timedelta(hours=1)),
            (timedelta(days=365), timedelta(days=1)),
        ],
    )
    def test_bucket_is_never_after_the_deadline(self, duration, step):
        """The bucket is the deadline rounded down to a step, keeping at least 90% of the life."""
        bucket = RetentionPolicy.delete_after(duration).bucket(NOW)
        deadline = NOW + duration
        assert bucket is not None
        assert bucket <= deadline
        assert deadline - bucket < step
        assert bucket - NOW >= duration * 0.9 - timedelta(seconds=1)

    def test_same_bucket_for_messages_close_in_time(self):
        """Messages published within one step share a bucket (one key, not one per message)."""
        policy = RetentionPolicy.delete_after(timedelta(days=30))
        buckets = {policy.bucket(NOW + timedelta(minutes=m)) for m in range(0, 60, 5)}
        assert len(buckets) <= 2

    def test_delete_at_in_the_past(self):
        """A deadline already passed buckets at now: shredded at the next enforcement."""
        bucket = RetentionPolicy.delete_at(NOW - timedelta(days=1)).bucket(NOW)
        assert bucket == NOW.replace(microsecond=0)

    def test_immediate_buckets_by_hour_plus_grace(self):
        """delete_immediately() keys live one hour bucket plus the grace."""
        bucket = RetentionPolicy.delete_immediately().bucket(NOW)
        assert bucket == NOW.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1) + IMMEDIATE_GRACE

    def test_bucket_deadline_is_aligned(self):
        """Bucket moments are aligned to whole steps (stable names across processes)."""
        moment = bucket_deadline(NOW, NOW + timedelta(days=400))
        assert (moment.hour, moment.minute, moment.second, moment.microsecond) == (0, 0, 0, 0)
