#!/usr/bin/env python3
"""Sends one QMP command to a QEMU monitor socket and prints its answer as JSON.

    qmp.py SOCKET COMMAND [ARGUMENTS-JSON]

Exits 1 (the error on stderr) when QEMU answers with an error or the socket fails. Used by
scripts/vm/migrate.conf to drive live migration; the standard library only.
"""

import json
import socket
import sys


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path, command = sys.argv[1], sys.argv[2]
    arguments = json.loads(sys.argv[3]) if len(sys.argv) == 4 else None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        stream = sock.makefile("rw", encoding="utf-8", newline="\n")

        def answer() -> dict:
            # Events (asynchronous notices) may come before the answer: skip them.
            while True:
                line = stream.readline()
                if not line:
                    raise ConnectionError("QEMU closed the monitor socket")
                message = json.loads(line)
                if "event" not in message:
                    return message

        def execute(name: str, args=None) -> dict:
            request = {"execute": name}
            if args is not None:
                request["arguments"] = args
            stream.write(json.dumps(request) + "\n")
            stream.flush()
            return answer()

        greeting = answer()
        if "QMP" not in greeting:
            raise ConnectionError(f"no QMP greeting: {greeting}")
        execute("qmp_capabilities")
        reply = execute(command, arguments)
    if "error" in reply:
        print(f"qmp {command}: {reply['error'].get('desc', reply['error'])}", file=sys.stderr)
        return 1
    print(json.dumps(reply.get("return", {})))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError) as error:
        print(f"qmp: {error}", file=sys.stderr)
        sys.exit(1)
