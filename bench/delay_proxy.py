"""A TCP proxy that delays every chunk DELAY seconds each way (RTT 2 * DELAY): bench/pipelining.sh.

    python bench/delay_proxy.py LISTEN_PORT TARGET_PORT DELAY

Loopback has no round-trip time to speak of, and this machine's kernel has no netem: the
proxy stands in for a primary in another data centre, so that saving round trips shows.
"""

from __future__ import annotations

import asyncio
import sys


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await reader.read(65536):
            await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def main(listen: int, target: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            pump(reader, upstream_writer, delay), pump(upstream_reader, writer, delay)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
