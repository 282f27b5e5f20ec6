"""The gateway's HTTP listening socket: accepted connections have Nagle off."""

from __future__ import annotations

import asyncio
import socket

from gateway.server import _bind_socket


async def test_accepted_connections_have_tcp_nodelay():
    # Without TCP_NODELAY a reply written in two pieces (headers, then body) waits for the
    # client's delayed ACK: ~40 ms added to every response and to SSE chunks.
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            sock = transport.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await loop.create_server(Proto, sock=_bind_socket("127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(accepted, 30) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
