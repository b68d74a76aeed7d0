"""The command line: `python -m train --instance-data PATH --instance-prompt TEXT --output PATH.tar`.

Every flag is a TrainConfig field with `-` for `_` (the Cog input names), with its default and
help taken from the field. Booleans take a value, as Cog does: `--train-text-encoder false`.
Exit 0 on success; on a user mistake, exit 2 with one line on stderr starting `error:`.
"""

from __future__ import annotations

import argparse

from .config import TrainConfig, field_type, fields
from .errors import exit_status

REQUIRED = ("instance_data", "instance_prompt", "output")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the contract for user mistakes
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m train",
                     description="DreamBooth: fine-tune Stable Diffusion on a few photos of a "
                                 "subject and write a tarball of weights.")
    return add_settings(parser, TrainConfig, REQUIRED)


def add_settings(parser: argparse.ArgumentParser, settings: type, required=()):
    """A flag for each field of a settings dataclass, with its type, choices, default and
    help (train/generate.py's command line is made the same way)."""
    for f in fields(settings):
        kind = field_type(f, settings)
        meta = f.metadata
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, required=f.name in required,
            type=parse_bool if kind is bool else kind, choices=meta["choices"],
            default=f.default, metavar=_metavar(kind, meta),
            help=meta["help"] + ("" if f.default in (None, "") else f" (default: {f.default})"))
    return parser


def _metavar(kind, meta):
    if meta["choices"]:
        return "|".join(meta["choices"])
    return {bool: "true|false", int: "N", float: "X"}.get(kind, "TEXT")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .recipe import run  # after parsing: --help and flag errors answer without torch

    return exit_status(lambda: run(TrainConfig(**vars(args))))


def to_argv(config: TrainConfig) -> list[str]:
    """The flags that give `config` on this command line (settings at their default are left
    out): how the Cog predictor hands a run to several processes."""
    argv = []
    for f in fields():
        value = getattr(config, f.name)
        if value != f.default:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            argv += ["--" + f.name.replace("_", "-"), text]
    return argv
