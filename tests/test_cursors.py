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
    assert h.last == (5, 0) and not h.held and h.held_bytes == 0
    assert not h.replayed((5, 0))


def test_handoff_with_nothing_replayed_passes_everything_after_head() -> None:
    h = Handoff()
    h.hold((1, 0), b"a")
    h.hold((2, 0), b"b")
    h.replayed((1, 0))  # the head at subscribe time
    assert h.release() == [b"b"]


@pytest.mark.parametrize("sizes, bound, dropped", [((4, 4, 2), 10, 0), ((4, 4, 3), 10, 3), ((11,), 10, 1)])
def test_handoff_holds_within_a_bound_or_lets_everything_go(sizes: tuple[int, ...], bound: int, dropped: int) -> None:
    h = Handoff()
    answers = [h.hold_within((n, 0), b"x" * size, bound) for n, size in enumerate(sizes, 1)]
    assert answers == [0] * (len(sizes) - 1) + [dropped]
    if dropped:
        assert not h.held and h.held_bytes == 0 and h.dropped == dropped
    else:
        assert len(h.held) == len(sizes) and h.held_bytes == sum(sizes) and h.dropped == 0
    assert h.peak <= bound


def test_handoff_after_letting_go_holds_anew_within_the_bound() -> None:
    h = Handoff(last=(1, 0))
    for n in (2, 3, 4):
        assert h.hold_within((n, 0), b"abcd", 10) == (3 if n == 4 else 0)
    assert h.hold_within((5, 0), b"abcd", 10) == 0  # the refill reads 2..4 from the history
    assert [h.replayed((n, 0)) for n in (2, 3, 4, 5)] == [True, True, True, True]
    assert h.release() == []  # 5 came from the history too
    assert h.hold_within((6, 0), b"abcdefghij", 10) == 0  # the bytes taken out no longer count
    assert (h.peak, h.dropped) == (10, 3)


def test_handoff_take_held_takes_items_out_as_they_come() -> None:
    h = Handoff()
    for n in (1, 2):
        h.hold((n, 0), b"ab")
    taken = []
    for entry, payload in h.take_held():
        taken.append(entry)
        assert h.held_bytes == 2 * len(h.held)  # only what is still held counts
        if entry == (1, 0):
            h.hold((3, 0), b"ab")  # held while the caller is between two items
    assert taken == [(1, 0), (2, 0), (3, 0)] and h.last == (3, 0) and not h.held
