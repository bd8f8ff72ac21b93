"""The synchronous room core: what each request changes and what it sends to whom."""

from __future__ import annotations

import pytest

from trio_chat.protocol import (
    NO_SUCH_ID,
    ErrorCode,
    ProtocolError,
    encode_chat,
    encode_joined,
    encode_joined_announcement,
    encode_left,
    encode_left_announcement,
)
from trio_chat.rooms import Outcome, Registry, Session

IP = "10.0.0.1"
PORT = 7000


class Recorder:
    """A recipient that keeps everything pushed to it, in order."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def push(self, data: bytes) -> None:
        self.received.append(data)

    def take(self) -> list[bytes]:
        """Everything received since the last call."""
        received, self.received = self.received, []
        return received


class Member:
    """A session with its recorder, as one connection appears to the rooms."""

    def __init__(self) -> None:
        self.inbox = Recorder()
        self.session = Session(self.inbox)

    def take(self) -> list[bytes]:
        return self.inbox.take()


def carry_out(registry: Registry, member: Member, outcome: Outcome) -> None:
    """Do what the server does with an outcome: reply first, then apply each event."""
    if outcome.reply is not None:
        member.inbox.push(outcome.reply)
    for event in outcome.events:
        registry.apply(event)


def join(registry: Registry, member: Member, room_name: str, client_name: str) -> Outcome:
    """JOIN as the single-process broker does it: allocate the room, then join."""
    room_ref = registry.allocate_room(room_name)
    outcome = registry.join(member.session, room_ref, client_name, server_ip=IP, server_port=PORT)
    carry_out(registry, member, outcome)
    return outcome


def leave(registry: Registry, member: Member, room_ref: int, join_id: int) -> Outcome:
    """LEAVE, carried out."""
    outcome = registry.leave(member.session, room_ref, join_id)
    carry_out(registry, member, outcome)
    return outcome


def chat(registry: Registry, member: Member, room_ref: int, name: str, message: str) -> Outcome:
    """CHAT, carried out."""
    outcome = registry.chat(member.session, room_ref, name, message)
    carry_out(registry, member, outcome)
    return outcome


def disconnect(registry: Registry, member: Member) -> Outcome:
    """DISCONNECT, carried out."""
    outcome = registry.disconnect(member.session)
    carry_out(registry, member, outcome)
    return outcome


def joined_replies(member: Member) -> list[bytes]:
    """The JOINED replies among what `member` received since the last `take`."""
    return [data for data in member.take() if data.startswith(b"JOINED_CHATROOM:")]


@pytest.fixture
def registry() -> Registry:
    """An empty registry."""
    return Registry()


# -- JOIN ------------------------------------------------------------------------------------


def test_join_sends_nothing_itself(registry: Registry) -> None:
    """`join` only returns the announcement event, carrying the joiner's JOINED reply as its
    welcome; nothing is pushed until the event is applied."""
    alice = Member()
    room_ref = registry.allocate_room("r")
    outcome = registry.join(alice.session, room_ref, "alice", server_ip=IP, server_port=PORT)
    assert alice.take() == []
    assert outcome.reply is None
    assert [event.data for event in outcome.events] == [encode_joined_announcement(0, "alice")]
    assert [event.welcome for event in outcome.events] == [encode_joined("r", IP, PORT, 0, 0)]


def test_joiner_gets_joined_then_its_own_announcement(registry: Registry) -> None:
    """The joiner receives JOINED, then the announcement of its own join."""
    alice = Member()
    join(registry, alice, "r", "alice")
    assert alice.take() == [
        encode_joined("r", IP, PORT, 0, 0),
        encode_joined_announcement(0, "alice"),
    ]


def test_members_get_the_join_announcement(registry: Registry) -> None:
    """Everyone already in the room receives a newcomer's announcement; no one else does."""
    alice, bob, carol = Member(), Member(), Member()
    join(registry, alice, "r", "alice")
    join(registry, carol, "other", "carol")
    alice.take()
    carol.take()
    join(registry, bob, "r", "bob")
    assert alice.take() == [encode_joined_announcement(0, "bob")]
    assert carol.take() == []


def test_room_refs_count_from_zero_per_name(registry: Registry) -> None:
    """Each new room name gets the next ROOM_REF from 0; a known name keeps its ROOM_REF."""
    alice, bob = Member(), Member()
    join(registry, alice, "first", "a")
    join(registry, alice, "second", "a")
    join(registry, bob, "second", "b")
    join(registry, bob, "third", "b")
    assert [registry.room_ref_for(name) for name in ("first", "second", "third")] == [0, 1, 2]
    assert registry.room_ref_for("never") is None


def test_room_refs_are_never_reused(registry: Registry) -> None:
    """A room that empties keeps its ROOM_REF, and new rooms never take it."""
    alice = Member()
    join(registry, alice, "first", "a")
    leave(registry, alice, 0, 0)
    disconnect(registry, alice)
    bob = Member()
    join(registry, bob, "second", "b")
    join(registry, bob, "first", "b")
    assert registry.room_ref_for("second") == 1
    assert registry.room_ref_for("first") == 0


def test_join_id_per_session_reused_across_rooms(registry: Registry) -> None:
    """A session gets the next JOIN_ID from 0 at its first join and keeps it in every room."""
    alice, bob = Member(), Member()
    join(registry, alice, "r1", "alice")
    join(registry, bob, "r1", "bob")
    join(registry, bob, "r2", "bob")
    join(registry, alice, "r2", "alice")
    assert joined_replies(alice) == [
        encode_joined("r1", IP, PORT, 0, 0),
        encode_joined("r2", IP, PORT, 1, 0),
    ]
    assert joined_replies(bob) == [
        encode_joined("r1", IP, PORT, 0, 1),
        encode_joined("r2", IP, PORT, 1, 1),
    ]


def test_join_id_kept_after_leaving_everything(registry: Registry) -> None:
    """A session that left all its rooms joins again with the same JOIN_ID."""
    alice, bob = Member(), Member()
    join(registry, alice, "r", "alice")
    leave(registry, alice, 0, 0)
    join(registry, bob, "r", "bob")
    alice.take()
    join(registry, alice, "r", "alice")
    assert alice.take()[0] == encode_joined("r", IP, PORT, 0, 0)


def test_many_rooms_under_different_names(registry: Registry) -> None:
    """A session may be in several rooms at once, under a different name in each."""
    alice, bob = Member(), Member()
    join(registry, alice, "r1", "alice")
    join(registry, alice, "r2", "ally")
    join(registry, bob, "r2", "bob")
    assert alice.take()[-1] == encode_joined_announcement(1, "bob")
    assert alice.session.rooms == {0: "alice", 1: "ally"}


def test_rejoin_does_not_duplicate_membership(registry: Registry) -> None:
    """Joining a room again replies JOINED with the same numbers and announces again, once."""
    alice, bob = Member(), Member()
    join(registry, alice, "r", "alice")
    join(registry, bob, "r", "bob")
    alice.take()
    bob.take()
    join(registry, alice, "r", "alice")
    assert alice.take() == [
        encode_joined("r", IP, PORT, 0, 0),
        encode_joined_announcement(0, "alice"),
    ]
    assert bob.take() == [encode_joined_announcement(0, "alice")]
    chat(registry, bob, 0, "bob", "once")
    assert alice.take() == [encode_chat(0, "bob", "once")]


def test_too_many_rooms_is_error_5() -> None:
    """A join past max_rooms_per_session raises error 5 and changes nothing."""
    registry = Registry(max_rooms_per_session=2)
    alice = Member()
    join(registry, alice, "r1", "a")
    join(registry, alice, "r2", "a")
    alice.take()
    with pytest.raises(ProtocolError) as info:
        join(registry, alice, "r3", "a")
    assert info.value.code is ErrorCode.LIMIT_REACHED
    assert alice.take() == []
    assert set(alice.session.rooms) == {0, 1}


def test_rejoin_at_the_room_limit_is_allowed() -> None:
    """At the limit, joining a room the session is already in still works."""
    registry = Registry(max_rooms_per_session=1)
    alice = Member()
    join(registry, alice, "r1", "a")
    alice.take()
    join(registry, alice, "r1", "a")
    assert alice.take()[0] == encode_joined("r1", IP, PORT, 0, 0)


def test_leaving_frees_a_room_slot() -> None:
    """After leaving a room a session at the limit may join another."""
    registry = Registry(max_rooms_per_session=1)
    alice = Member()
    join(registry, alice, "r1", "a")
    leave(registry, alice, 0, 0)
    alice.take()
    join(registry, alice, "r2", "a")
    assert alice.take()[0] == encode_joined("r2", IP, PORT, 1, 0)


# -- LEAVE -----------------------------------------------------------------------------------


def test_leave_replies_then_announces_to_all_including_leaver(registry: Registry) -> None:
    """LEAVE: the leaver gets LEFT then its own announcement; the others get the announcement."""
    alice, bob = Member(), Member()
    join(registry, alice, "r", "alice")
    join(registry, bob, "r", "bob")
    alice.take()
    bob.take()
    leave(registry, alice, 0, 0)
    assert alice.take() == [encode_left(0, 0), encode_left_announcement(0, "alice")]
    assert bob.take() == [encode_left_announcement(0, "alice")]


def test_nothing_reaches_a_leaver_afterwards(registry: Registry) -> None:
    """After its leave announcement a client receives nothing more from that room."""
    alice, bob = Member(), Member()
    join(registry, alice, "r", "alice")
    join(registry, bob, "r", "bob")
    leave(registry, alice, 0, 0)
    alice.take()
    chat(registry, bob, 0, "bob", "still here?")
    join(registry, Member(), "r", "carol")
    assert alice.take() == []
    with pytest.raises(ProtocolError) as info:
        chat(registry, alice, 0, "alice", "let me in")
    assert info.value.code is ErrorCode.NOT_A_MEMBER


def test_leave_announcement_uses_the_joined_name(registry: Registry) -> None:
    """The leave announcement names the client as it joined that room."""
    alice = Member()
    join(registry, alice, "r", "ally")
    alice.take()
    leave(registry, alice, 0, 0)
    assert alice.take()[1] == encode_left_announcement(0, "ally")


def test_leave_echoes_the_requested_numbers(registry: Registry) -> None:
    """LEFT echoes the request's ROOM_REF and JOIN_ID, even a JOIN_ID that is not the session's."""
    alice = Member()
    join(registry, alice, "r", "alice")
    alice.take()
    leave(registry, alice, 0, 42)
    assert alice.take() == [encode_left(0, 42), encode_left_announcement(0, "alice")]


def test_repeated_leave_replies_without_announcing(registry: Registry) -> None:
    """A second LEAVE of the same room gets the same LEFT reply and announces nothing."""
    alice, bob = Member(), Member()
    join(registry, alice, "r", "alice")
    join(registry, bob, "r", "bob")
    leave(registry, alice, 0, 0)
    alice.take()
    bob.take()
    outcome = leave(registry, alice, 0, 0)
    assert outcome.events == ()
    assert alice.take() == [encode_left(0, 0)]
    assert bob.take() == []


@pytest.mark.parametrize("room_ref", [0, 99], ids=["existing-room", "unknown-room"])
def test_stray_leave_replies_without_announcing(registry: Registry, room_ref: int) -> None:
    """A LEAVE for a room the session is not in, or for no room, gets LEFT and no announcement."""
    alice, bob = Member(), Member()
    join(registry, bob, "r0", "bob")
    join(registry, alice, "r1", "alice")
    bob.take()
    alice.take()
    outcome = leave(registry, alice, room_ref, 5)
    assert outcome.events == ()
    assert alice.take() == [encode_left(room_ref, 5)]
    assert bob.take() == []


def test_leave_keeps_other_rooms(registry: Registry) -> None:
    """Leaving one room does not affect the session's other rooms."""
    alice, bob = Member(), Member()
    join(registry, alice, "r0", "alice")
    join(registry, alice, "r1", "alice")
    join(registry, bob, "r1", "bob")
    leave(registry, alice, 0, 0)
    alice.take()
    chat(registry, bob, 1, "bob", "hi")
    assert alice.take() == [encode_chat(1, "bob", "hi")]
    assert alice.session.rooms == {1: "alice"}


# -- CHAT ------------------------------------------------------------------------------------


def test_chat_reaches_every_member_including_sender(registry: Registry) -> None:
    """A CHAT goes to every member, the sender included, and to no one else; no reply."""
    alice, bob, carol = Member(), Member(), Member()
    join(registry, alice, "r", "alice")
    join(registry, bob, "r", "bob")
    join(registry, carol, "other", "carol")
    for member in (alice, bob, carol):
        member.take()
    outcome = chat(registry, alice, 0, "alice", "hello\nworld")
    assert outcome.reply is None
    assert alice.take() == [encode_chat(0, "alice", "hello\nworld")]
    assert bob.take() == [encode_chat(0, "alice", "hello\nworld")]
    assert carol.take() == []


def test_chat_uses_the_requests_client_name(registry: Registry) -> None:
    """A CHAT carries the CLIENT_NAME of the request, not the name joined with."""
    alice = Member()
    join(registry, alice, "r", "alice")
    alice.take()
    chat(registry, alice, 0, "someone else", "hi")
    assert alice.take() == [encode_chat(0, "someone else", "hi")]


def test_chat_bytes_are_built_once(registry: Registry) -> None:
    """Every member is handed the very same bytes object for one broadcast."""
    alice, bob = Member(), Member()
    join(registry, alice, "r", "alice")
    join(registry, bob, "r", "bob")
    alice.take()
    bob.take()
    chat(registry, alice, 0, "alice", "hi")
    assert alice.take()[0] is bob.take()[0]


def test_chat_to_unknown_room_is_error_2(registry: Registry) -> None:
    """A CHAT to a ROOM_REF never assigned raises error 2."""
    alice = Member()
    join(registry, alice, "r", "alice")
    with pytest.raises(ProtocolError) as info:
        registry.chat(alice.session, 1, "alice", "hi")
    assert info.value.code is ErrorCode.NO_SUCH_ROOM


def test_error_2_names_the_room_ref_unless_it_was_too_large_to_read(registry: Registry) -> None:
    """Error 2 names a ROOM_REF read as its value (-1 included); one too large to read is
    not repeated back."""
    alice = Member()
    join(registry, alice, "r", "alice")
    descriptions = []
    for room_ref in (-1, 7, NO_SUCH_ID):
        with pytest.raises(ProtocolError) as info:
            registry.chat(alice.session, room_ref, "alice", "hi")
        descriptions.append(info.value.description)
    assert descriptions == [
        "no room has ROOM_REF -1",
        "no room has ROOM_REF 7",
        "no room has that ROOM_REF",
    ]


def test_chat_to_room_not_joined_is_error_3(registry: Registry) -> None:
    """A CHAT to an existing room the session is not in raises error 3 and reaches no one."""
    alice, bob = Member(), Member()
    join(registry, bob, "r", "bob")
    bob.take()
    with pytest.raises(ProtocolError) as info:
        registry.chat(alice.session, 0, "alice", "hi")
    assert info.value.code is ErrorCode.NOT_A_MEMBER
    assert bob.take() == []


# -- DISCONNECT ------------------------------------------------------------------------------


def test_disconnect_announces_in_ascending_room_ref(registry: Registry) -> None:
    """DISCONNECT announces the leave in every room by ascending ROOM_REF, with the joined names."""
    other, alice = Member(), Member()
    for name in ("r0", "r1", "r2"):
        join(registry, other, name, "other")
    join(registry, alice, "r2", "al")
    join(registry, alice, "r0", "alice")
    join(registry, alice, "r1", "ally")
    alice.take()
    other.take()
    outcome = disconnect(registry, alice)
    expected = [
        encode_left_announcement(0, "alice"),
        encode_left_announcement(1, "ally"),
        encode_left_announcement(2, "al"),
    ]
    assert outcome.reply is None
    assert alice.take() == expected
    assert other.take() == expected


def test_disconnect_leaves_every_room(registry: Registry) -> None:
    """After DISCONNECT the session is in no room and receives nothing from any."""
    alice, bob = Member(), Member()
    join(registry, alice, "r0", "alice")
    join(registry, alice, "r1", "alice")
    join(registry, bob, "r0", "bob")
    join(registry, bob, "r1", "bob")
    disconnect(registry, alice)
    alice.take()
    bob.take()
    chat(registry, bob, 0, "bob", "a")
    chat(registry, bob, 1, "bob", "b")
    assert alice.take() == []
    assert alice.session.rooms == {}
    assert bob.take() == [encode_chat(0, "bob", "a"), encode_chat(1, "bob", "b")]


def test_disconnect_without_rooms_announces_nothing(registry: Registry) -> None:
    """A session in no room disconnects without any event, even after leaving its rooms."""
    alice, bob = Member(), Member()
    join(registry, bob, "r", "bob")
    join(registry, alice, "r", "alice")
    leave(registry, alice, 0, 0)
    bob.take()
    assert disconnect(registry, alice).events == ()
    assert disconnect(registry, Member()).events == ()
    assert bob.take() == []


def test_disconnect_twice_announces_once(registry: Registry) -> None:
    """A second disconnect of the same session announces nothing more."""
    alice, bob = Member(), Member()
    join(registry, alice, "r", "alice")
    join(registry, bob, "r", "bob")
    disconnect(registry, alice)
    bob.take()
    disconnect(registry, alice)
    assert bob.take() == []
