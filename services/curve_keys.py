"""`rose curve-keys <folder>`: write CURVE key pairs for the internal links and print the settings."""

from __future__ import annotations

import argparse

from shared.zmq_security import write_key_pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="where to write server.key(_secret), client.key(_secret) and authorized/")


def main(settings, args: argparse.Namespace) -> int:
    for name, path in write_key_pairs(args.folder).items():
        print(f"{name}={path}")
    return 0
