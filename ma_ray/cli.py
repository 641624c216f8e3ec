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
import time
from pathlib import Path
from typing import Callable, Dict, List, NoReturn, Optional, Tuple

from ma_ray.config import Config, check_split, load
from ma_ray.errors import MaRayError

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
    return load(args.config, args.overrides)


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


# --- train -----------------------------------------------------------------------------------

LOCAL_PRESET = Path(__file__).resolve().parent.parent / "cluster" / "local-cpu.yaml"


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (default: cluster/local-cpu.yaml, the emulated 4 x 4 CPU preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set train.seq_length=32 (repeatable)")
    parser.add_argument("--steps", type=int, metavar="N", help="optimizer steps to run (default: train.num_train_steps)")
    parser.add_argument("--out", metavar="DIR", help="run folder for metrics.jsonl (default: runs/<time>)")


def _train_config(args: argparse.Namespace) -> Config:
    if args.config is None:
        if not LOCAL_PRESET.is_file():
            raise UsageError(f"no --config given and the local preset {LOCAL_PRESET} is missing")
        args.config = str(LOCAL_PRESET)
    return _load_config(args)


def _positive_steps(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps: must be at least 1, got {args.steps}")


def _train_run(args: argparse.Namespace) -> int:
    from ma_ray.train import train

    _positive_steps(args)
    cfg = _train_config(args)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    last = train(cfg, out, args.steps)
    print(json.dumps({"out": str(out), **last}))
    return 0


# --- verify ----------------------------------------------------------------------------------

def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    _train_arguments(parser)
    parser.set_defaults(out=None)
    parser.add_argument("--attention-gpus", type=int, metavar="K",
                        help="attention GPUs of the split (default: cluster.attention_gpus)")
    parser.add_argument("--precision", choices=["fp64", "fp32"], default="fp64",
                        help="arithmetic of both runs (default fp64: see README, Verification)")
    parser.add_argument("--rebalance", metavar="STEP:K[,STEP:K...]",
                        help="move to K attention GPUs before STEP (heads, experts and AdamW moments migrate)")


def _verify_run(args: argparse.Namespace) -> int:
    from ma_ray.verify import parse_rebalances, verify

    _positive_steps(args)
    cfg = _train_config(args)
    if args.attention_gpus is not None:
        check_split(cfg, args.attention_gpus, key="--attention-gpus")
    rebalances = parse_rebalances(args.rebalance)
    steps = args.steps or max(2, *(s + 1 for s in rebalances))
    report = verify(cfg, args.attention_gpus, steps, args.precision, rebalances=rebalances)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


# --- wiring ----------------------------------------------------------------------------------

Command = Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: Dict[str, Command] = {
    "config": ("print the resolved config as YAML", _config_arguments, _config_run),
    "plan": ("show which GPU holds which heads or experts, memory and predicted stage times",
             _plan_arguments, _plan_run),
    "train": ("train on the Ray cluster with attention and experts on disjoint GPU pools",
              _train_arguments, _train_run),
    "verify": ("train distributed and single-process from the same start; compare loss, gradients, parameters",
               _verify_arguments, _verify_run),
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
    except (UsageError, MaRayError) as exc:
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
