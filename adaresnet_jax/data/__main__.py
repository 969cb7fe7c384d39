"""``python -m adaresnet_jax.data download cifar10 [--dir D]``: fetch a data set ahead of a (cluster) job.

Prints the archive's path on stdout. Exit codes: 0 done, 2 an error (one line ``error: ...`` on stderr;
without a name, that line lists the names there are).
"""

from __future__ import annotations

import sys

from adaresnet_jax.cli import OneLineParser
from adaresnet_jax.data.download import ARCHIVES, CACHE_ENV, MIRROR_ENV, fetch
from adaresnet_jax.data.errors import DataError


class _Parser(OneLineParser):
    """Errors as one line ``error: ...`` on stderr (exit code 2)."""

    error_format = "error: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry: 0 done, 2 bad arguments or a failed download."""
    parser = _Parser(prog="python -m adaresnet_jax.data", description="Prepare data sets ahead of a run.")
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser(
        "download", help="download a CIFAR python archive (verified by MD5) and print its path",
        epilog=f"The base URL is ${MIRROR_ENV} if set (an internal mirror), else the official site.")
    download.add_argument("name", nargs="?", choices=sorted(ARCHIVES), help=f"one of {', '.join(sorted(ARCHIVES))}")
    download.add_argument("--dir", default=None,
                          help=f"folder to download into (default: ${CACHE_ENV}, else ~/.cache/adaresnet_jax)")
    args = parser.parse_args(argv)
    if args.name is None:
        parser.error(f"name the data set to download: one of {', '.join(sorted(ARCHIVES))} "
                     f"(python -m adaresnet_jax.data download {sorted(ARCHIVES)[0]})")
    try:
        path = fetch(args.name, args.dir, or_else="or pass --dir the folder that holds it")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
