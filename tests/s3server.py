"""A real S3-compatible server on loopback for the tests: moto's server, answering one request at a time.

    python -m tests.s3server [--port 0]      prints "PORT <n>" once it listens

moto's own `python -m moto.server` serves each request in a thread, and its conditional PUT checks
the ETag and then writes, two steps with no lock between them: 16 writers racing on one If-Match
won twice in 1 round of 200 here. S3 decides a conditional write atomically, so the tests serve
requests one at a time (werkzeug without threads), which makes moto's check-and-write atomic too.
"""

from __future__ import annotations

import argparse
import os
import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.s3server", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args(argv)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", args.port, app, threaded=False, request_handler=MotoRequestHandler)
    os.environ["MOTO_PORT"] = str(server.server_port)
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
