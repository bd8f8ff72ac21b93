"""A first end-to-end check over a real socket."""

from tests.chatclient import Client


async def test_helo_then_join_over_tcp(server_port: int) -> None:
    """HELO reports the address and port the client reached; JOIN replies then announces."""
    async with await Client.connect(server_port) as client:
        await client.send("HELO hi\n")
        await client.expect(f"HELO hi\nIP:127.0.0.1\nPort:{server_port}\nStudentID:trio-chat\n")
        await client.send("JOIN_CHATROOM: r\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: a\n")
        await client.expect(
            f"JOINED_CHATROOM: r\nSERVER_IP: 127.0.0.1\nPORT: {server_port}\nROOM_REF: 0\n"
            "JOIN_ID: 0\nCHAT: 0\nCLIENT_NAME: a\nMESSAGE: a has joined this chatroom.\n\n"
        )
        await client.expect_nothing()
