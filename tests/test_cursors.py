from __future__ import annotations

import pytest

from streamd.cursors import ZERO, Cursor, Handoff, ReplayPlan, decode, encode, parse_entry_id, plan_resume
from streamd.errors import BadRequest


def test_roundtrip() -> None:
    c = decode(encode("ab12", "1732212345678-3"))
    assert c == Cursor("ab12", (1732212345678, 3))
    assert str(c) == "ab12.1732212345678-3"
    assert decode(encode(None, "0-0")) == Cursor("0", ZERO)
    assert parse_entry_id(b"5-1") == (5, 1) and parse_entry_id("7") == (7, 0)


@pytest.mark.parametrize("bad", ["", "1-0", "ab.1", "ab.-1", "ab.1-x", "a-b.1-0", ".1-0", 5, None, "e." + "1" * 80])
def test_malformed(bad: object) -> None:
    with pytest.raises(BadRequest):
        decode(bad)


@pytest.mark.parametrize(
    "cursor, epoch, trimmed, plan",
    [
        # Same history, nothing trimmed past the cursor: resume after it.
        (Cursor("e1", (10, 0)), "e1", ZERO, ReplayPlan((10, 0), gap=False)),
        (Cursor("e1", (10, 0)), "e1", (10, 0), ReplayPlan((10, 0), gap=False)),
        # Items after the cursor were trimmed away.
        (Cursor("e1", (10, 0)), "e1", (11, 0), ReplayPlan((10, 0), gap=True)),
        # The history was lost and recreated.
        (Cursor("e1", (10, 0)), "e2", ZERO, ReplayPlan(ZERO, gap=True)),
        # The history is gone altogether.
        (Cursor("e1", (10, 0)), None, ZERO, ReplayPlan(ZERO, gap=True)),
        # Subscribed while the feed was empty.
        (Cursor("0", ZERO), None, ZERO, ReplayPlan(ZERO, gap=False)),
        (Cursor("0", ZERO), "e1", ZERO, ReplayPlan(ZERO, gap=False)),
        (Cursor("0", ZERO), "e1", (3, 0), ReplayPlan(ZERO, gap=True)),
    ],
)
def test_plan_resume(cursor: Cursor, epoch: str | None, trimmed: tuple[int, int], plan: ReplayPlan) -> None:
    assert plan_resume(cursor, epoch, trimmed) == plan


def test_handoff_drops_live_items_already_replayed() -> None:
    h = Handoff()
    # Live items 2..5 arrive while the history (1..3) is being replayed.
    for n in (2, 3, 4, 5):
        h.hold((n, 0), b"live%d" % n)
    assert [h.replayed((n, 0)) for n in (1, 2, 3)] == [True, True, True]
    assert h.release() == [b"live4", b"live5"]
    assert h.last == (5, 0) and h.held == [] and h.held_bytes == 0
    assert not h.replayed((5, 0))


def test_handoff_with_nothing_replayed_passes_everything_after_head() -> None:
    h = Handoff()
    h.hold((1, 0), b"a")
    h.hold((2, 0), b"b")
    h.replayed((1, 0))  # the head at subscribe time
    assert h.release() == [b"b"]
