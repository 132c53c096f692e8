#!/usr/bin/env python3
"""Test and demo backends on loopback. Each argument starts one listener:

  echo:PORT          echo everything; on the client's FIN, finish echoing and send FIN
  tag:PORT:NAME      send NAME and a newline, then behave like echo
  sink:PORT          accept and never read (a peer that stalls)
  firehose:PORT      send bytes as fast as possible until the peer goes away

Prints "ready" on stdout once every listener is up. Port 0 picks a free port; the chosen ports are printed
as "ports P1 P2 ..." before "ready".
"""
import asyncio
import os
import sys


async def echo(reader, writer, tag=None):
    try:
        if tag:
            writer.write(tag.encode() + b"\n")
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()



async def firehose(reader, writer):
    chunk = b"x" * 65536
    try:
        while True:
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main(specs):
    servers, ports = [], []
    for spec in specs:
        parts = spec.split(":")
        kind, port = parts[0], int(parts[1])
        if kind == "echo":
            handler = echo
        elif kind == "tag":
            name = parts[2]
            handler = lambda r, w, name=name: echo(r, w, name)
        elif kind == "sink":
            async def handler(r, w):
                await asyncio.sleep(3600)
        elif kind == "firehose":
            handler = firehose
        else:
            raise SystemExit(f"unknown backend kind {kind}")
        host = os.environ.get("BACKEND_HOST", "127.0.0.1")
        server = await asyncio.start_server(handler, host, port, backlog=4096, reuse_address=True)
        servers.append(server)
        ports.append(server.sockets[0].getsockname()[1])
    print("ports " + " ".join(map(str, ports)), flush=True)
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        asyncio.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
