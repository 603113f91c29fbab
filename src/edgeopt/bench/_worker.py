"""The process ``bench_models`` times one model in: ``python -m edgeopt.bench._worker READ_FD WRITE_FD``."""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection

from edgeopt.bench.latency import serve


def main(argv: list[str]) -> None:
    read_fd, write_fd = (int(fd) for fd in argv)
    serve(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


if __name__ == "__main__":
    main(sys.argv[1:])
