"""The command lines' shared argparse parser: every error is one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit code 2), written as ``error_format`` says ({prog},
    {message}); a subclass changes only the format. Sub-command parsers are of the same class."""

    error_format = "{prog}: error: {message} (see --help)\n"

    def error(self, message: str) -> NoReturn:
        self.exit(2, self.error_format.format(prog=self.prog, message=message))
