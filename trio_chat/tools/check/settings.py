"""Every timeout and size the conformance checker uses, as one frozen value."""

from __future__ import annotations

from attrs import frozen

KIB = 1024
MIB = 1024 * KIB


@frozen(kw_only=True)
class Settings:
    """How the checker probes a server. Timeouts only matter when the server is wrong: a
    correct server answers in milliseconds, so they are generous enough for a loaded machine
    and a distant server."""

    # -- timeouts (seconds) --------------------------------------------------------------------
    connect_timeout: float = 5.0
    """How long opening one TCP connection may take."""
    reply_timeout: float = 5.0
    """How long to wait for bytes that should arrive (a reply, a broadcast, a close)."""
    optional_wait: float = 0.5
    """How long to wait for the rest of what docs/protocol.md describes once a tolerated shorter
    variant has arrived (a LEAVE reply without the leaver's own announcement, in cases not
    about leaving): long enough for a broadcast to cross the nodes of a cluster."""
    quiet_period: float = 0.25
    """How long nothing must arrive for the checker to take it that nothing more will: after
    each step in paced mode, after each probe of the preamble, and, against a server that
    reads one request per `recv`, before a HELO barrier that follows no reply. Long enough
    for a local server under load, short enough for a run of a few hundred steps."""
    case_timeout: float = 30.0
    """The most one ordinary case may take, all its steps together."""
    crowd_timeout: float = 60.0
    """The most the `crowd` and `many_connections` cases may take: they open `crowd_size`
    and `connections` connections at once."""
    flood_timeout: float = 60.0
    """The most the `slow_reader` case may take: it relays `flood_bytes` through the server."""
    room_limit_timeout: float = 60.0
    """The most the `error_5` case may take: it joins `room_limit` + 1 rooms."""
    kill_timeout: float = 2.0
    """How soon after KILL_SERVICE every connection must be closed and the port refuse new
    ones (docs/protocol.md: "promptly, well under a second with no backlog")."""

    # -- pacing --------------------------------------------------------------------------------
    byte_pause: float = 0.001
    """Pause between the bytes of a request sent one byte at a time, so each byte leaves in a
    TCP segment of its own rather than being coalesced with the next."""

    # -- the server's limits (docs/protocol.md section 6) ------------------------------------------
    max_line: int = 64 * KIB
    """The server's longest request line and CHAT message; `error_4` sends 6 KiB more."""
    room_limit: int = 1000
    """Rooms one connection may be in; `error_5` joins one more."""

    # -- load ----------------------------------------------------------------------------------
    connections: int = 64
    """Connections the `many_connections` case holds open at once, each sending a HELO: four
    times the 16 worker threads some servers stop at."""
    crowd_size: int = 200
    """Connections the `crowd` case opens at once, all in one room."""
    flood_bytes: int = 16 * MIB
    """Chat text the `slow_reader` case sends while one member reads nothing: 16 times the
    default 1 MiB per-client queue, plus room for the kernel's socket buffers, so a correct
    server must cut that member off."""
    flood_message: int = 8 * KIB
    """Size of each message of the flood."""
    flood_window: int = 256 * KIB
    """How far the flood's writer may run ahead of the echoes it has read back: well under
    the default 1 MiB queue, so that the writer itself is never a slow reader."""

    # -- what the server says about itself -----------------------------------------------------
    advertise_ip: str | None = None
    """The IP the server is configured to report in HELO and JOINED; None: the address the
    checker connected to, as docs/protocol.md says by default."""
    advertise_port: int | None = None
    """The port the server reports, when it differs from the one the checker connects to
    (behind a port mapping or a proxy); None: the port connected to."""
