"""The bytes docs/protocol.md section 2 prescribes, written out here as literal templates.

The checker never builds what it expects with the server's own encoders: an encoding mistake
there would then pass on both sides. Each template below is copied from the protocol
document; the requests are those of section 1.
"""

from __future__ import annotations

# -- replies and broadcasts (docs/protocol.md section 2) -----------------------------------------

JOINED = (
    "JOINED_CHATROOM: {room_name}\nSERVER_IP: {ip}\nPORT: {port}\nROOM_REF: {room_ref}\n"
    "JOIN_ID: {join_id}\n"
)
LEFT = "LEFT_CHATROOM: {room_ref}\nJOIN_ID: {join_id}\n"
CHAT = "CHAT: {room_ref}\nCLIENT_NAME: {client_name}\nMESSAGE: {message}\n\n"
ERROR = "ERROR_CODE: {code}\nERROR_DESCRIPTION: {description}\n"
HELO = "HELO {text}\nIP:{ip}\nPort:{port}\nStudentID:{student_id}\n"

JOINED_MESSAGE = "{client_name} has joined this chatroom."
LEFT_MESSAGE = "{client_name} has left this chatroom."

# -- requests (docs/protocol.md section 1) --------------------------------------------------------

JOIN_REQUEST = "JOIN_CHATROOM: {room_name}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: {client_name}\n"
LEAVE_REQUEST = "LEAVE_CHATROOM: {room_ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: {client_name}\n"
CHAT_REQUEST = (
    "CHAT: {room_ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: {client_name}\nMESSAGE: {message}\n\n"
)
DISCONNECT_REQUEST = "DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: {client_name}\n"

# What any ERROR_DESCRIPTION looks like in expectations: the text is the server's choice.
ANY_DESCRIPTION = "…"


def joined(room_name: str, ip: str, port: int, room_ref: int | str, join_id: int | str) -> bytes:
    """A JOINED_CHATROOM reply."""
    return JOINED.format(
        room_name=room_name, ip=ip, port=port, room_ref=room_ref, join_id=join_id
    ).encode()


def left(room_ref: int | str, join_id: int | str) -> bytes:
    """A LEFT_CHATROOM reply."""
    return LEFT.format(room_ref=room_ref, join_id=join_id).encode()


def chat(room_ref: int | str, client_name: str, message: str) -> bytes:
    """A CHAT broadcast."""
    return CHAT.format(room_ref=room_ref, client_name=client_name, message=message).encode()


def joined_announcement(room_ref: int | str, client_name: str) -> bytes:
    """The CHAT that announces `client_name` joined."""
    return chat(room_ref, client_name, JOINED_MESSAGE.format(client_name=client_name))


def left_announcement(room_ref: int | str, client_name: str) -> bytes:
    """The CHAT that announces `client_name` left."""
    return chat(room_ref, client_name, LEFT_MESSAGE.format(client_name=client_name))


def error(code: int) -> bytes:
    """An ERROR_CODE reply as expectations write it: any one-line description matches."""
    return ERROR.format(code=code, description=ANY_DESCRIPTION).encode()


def helo_head(text: str, ip: str, port: int) -> bytes:
    """A HELO reply up to its StudentID value, which is the server's choice."""
    return HELO.format(text=text, ip=ip, port=port, student_id="").removesuffix("\n").encode()


def join_request(room_name: str, client_name: str) -> bytes:
    """A JOIN_CHATROOM request over TCP."""
    return JOIN_REQUEST.format(room_name=room_name, client_name=client_name).encode()


def leave_request(room_ref: int | str, join_id: int | str, client_name: str) -> bytes:
    """A LEAVE_CHATROOM request."""
    return LEAVE_REQUEST.format(
        room_ref=room_ref, join_id=join_id, client_name=client_name
    ).encode()


def chat_request(room_ref: int | str, join_id: int | str, client_name: str, message: str) -> bytes:
    """A CHAT request."""
    return CHAT_REQUEST.format(
        room_ref=room_ref, join_id=join_id, client_name=client_name, message=message
    ).encode()


def disconnect_request(client_name: str) -> bytes:
    """A DISCONNECT request over TCP."""
    return DISCONNECT_REQUEST.format(client_name=client_name).encode()
