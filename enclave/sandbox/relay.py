"""The egress relay: the sandbox's only way to the network, started before the code.

It runs inside the sandbox, as the sandbox's own user, from the session's
egress directory mounted at /run/enclave, with the standard library alone:

    python3 -I -S relay.py SOCKET ENVIRONMENT PORT -- COMMAND...

1. Listen on 127.0.0.1:PORT, so that the port is ready before the code runs.
2. Fork twice: the grandchild, adopted by the sandbox's init, serves the
   port for as long as the sandbox lives, joining each connection to a new
   one on the unix socket SOCKET, which the host bridges to the egress
   proxy. It holds no descriptor of the session's stdin, stdout or stderr,
   so the session's output ends when the code's does. The sandbox's end
   takes it down with everything else.
3. Add the variables of the JSON file ENVIRONMENT (the proxy's address with
   the session's credentials, the CA bundle) to the environment and exec
   COMMAND, which keeps this process's pid.

The relay forwards bytes and nothing else: every decision is the proxy's.
"""

import json
import os
import socket
import sys

CHUNK_BYTES = 64 * 1024
BACKLOG = 128


def main(argv):
    try:
        socket_path, environment_path, port, separator, *command = argv[1:]
    except ValueError:
        sys.exit("usage: relay.py SOCKET ENVIRONMENT PORT -- COMMAND...")
    if separator != "--" or not command:
        sys.exit("usage: relay.py SOCKET ENVIRONMENT PORT -- COMMAND...")

    environment = dict(os.environ)
    try:
        # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off only
        # for sockets that say so, and with it on every response the relay
        # passes on in two writes waits 40 ms for a delayed ACK.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", int(port)))
        listener.listen(BACKLOG)
        _start_relay(listener, socket_path)
        listener.close()
        with open(environment_path, encoding="utf-8") as source:
            environment.update(json.load(source))
    except (OSError, ValueError) as exc:
        # The code still runs, with no way out: failing closed, and saying so.
        sys.stderr.write(f"enclave: the egress relay did not start ({exc})\n")
    os.execve(command[0], command, environment)


def _start_relay(listener, socket_path):
    child = os.fork()
    if child == 0:
        try:
            if os.fork() == 0:
                _serve(listener, socket_path)
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def _serve(listener, socket_path):
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    import asyncio

    async def pipe(reader, writer):
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            return False
        return True

    async def handle(reader, writer):
        connection = writer.get_extra_info("socket")
        if connection is not None:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            upstream = await asyncio.open_unix_connection(socket_path)
        except OSError:
            writer.close()
            return
        pending = {
            asyncio.ensure_future(pipe(reader, upstream[1])),
            asyncio.ensure_future(pipe(upstream[0], writer)),
        }
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, return_when=asyncio.FIRST_COMPLETED
                )
                # A failed side ends both; a clean end leaves a half-close.
                if not all(task.result() for task in done):
                    break
        finally:
            for task in pending:
                task.cancel()
            writer.close()
            upstream[1].close()

    async def serve():
        server = await asyncio.start_server(handle, sock=listener)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv)
