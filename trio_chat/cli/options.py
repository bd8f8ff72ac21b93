"""Types of command-line options: each checks a value and names what is wrong with it, and
argparse puts the option's name in front."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from trio_chat.limits import AddressSet

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def port_number(text: str) -> int:
    """A TCP port: an integer from 0 to 65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, not {value}")
    return value


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An option type for a number of `kind` that must be greater than zero."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse calls the type in its own messages
    return parse


def not_negative(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An option type for a number of `kind` that may be zero (which turns a limit off)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def networks(text: str) -> AddressSet:
    """A list of IP networks, ``CIDR[,CIDR...]``, or ``none``."""
    try:
        return AddressSet.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def log_level(text: str) -> str:
    """A logging threshold, in either case."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return text.upper()
