"""The ``ma-ray`` command line: parse, call, print.

Subcommands register themselves in ``COMMANDS`` as (help, add_arguments, run); adding one
(train, verify, status, rebalance) is one function pair and one entry. Bad input of any kind --
a ConfigError, an unreadable file, an argument argparse rejects -- ends as one line
``ma-ray: error: <message>`` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, NoReturn, Optional, Tuple

from ma_ray.config import Config, ConfigError, check_split, load

PROG = "ma-ray"
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input; ``main`` prints it as one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits on its own; raise instead so every error takes one path.
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --- shared options --------------------------------------------------------------------------

def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (default: the paper preset, i.e. the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set moe.top_k=1 (repeatable)")


def _load_config(args: argparse.Namespace) -> Config:
    try:
        return load(args.config, args.overrides)
    except UnicodeDecodeError as exc:  # config.load reads the file as UTF-8 and lets this through
        raise ConfigError(f"{args.config}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None


# --- config ----------------------------------------------------------------------------------

def _config_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_options(parser)


def _config_run(args: argparse.Namespace) -> int:
    sys.stdout.write(_load_config(args).to_yaml())
    return 0


# --- plan ------------------------------------------------------------------------------------

def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_options(parser)
    parser.add_argument("--attention-gpus", type=int, metavar="K",
                        help="attention GPUs of the split (default: cluster.attention_gpus)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _plan_run(args: argparse.Namespace) -> int:
    from ma_ray.parallel.report import plan_report

    cfg = _load_config(args)
    if args.attention_gpus is not None:
        check_split(cfg, args.attention_gpus, key="--attention-gpus")
    report = plan_report(cfg, args.attention_gpus)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 0


# --- wiring ----------------------------------------------------------------------------------

Command = Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: Dict[str, Command] = {
    "config": ("print the resolved config as YAML", _config_arguments, _config_run),
    "plan": ("show which GPU holds which heads or experts, memory and predicted stage times",
             _plan_arguments, _plan_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="MoE training with attention and experts on disjoint GPU pools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(cmd)
        cmd.set_defaults(run=run)
    return parser


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (UsageError, ConfigError) as exc:
        message = str(exc)
    except BrokenPipeError:
        # The reader went away (``ma-ray plan | head``): not an error of ours; silence the final
        # flush of stdout, which would fail the same way.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # an unreadable config file and the like
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
