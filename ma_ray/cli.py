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

from ma_ray.config import Config, ControlConfig, load
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
    # --attention-gpus K is the split of this run: it replaces cluster.attention_gpus and is the
    # split validated (errors name --attention-gpus), so a config's own split that K overrides
    # cannot fail the command.
    return load(args.config, args.overrides, attention_gpus=getattr(args, "attention_gpus", None))


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
    report = plan_report(cfg, args.attention_gpus)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 0


# --- train -----------------------------------------------------------------------------------

LOCAL_PRESET = Path(__file__).resolve().parent.parent / "cluster" / "local-cpu.yaml"


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the commands that run a job (train, verify)."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (default: cluster/local-cpu.yaml, the emulated 4 x 4 CPU preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set train.seq_length=32 (repeatable)")
    parser.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default: train.num_train_steps)")
    parser.add_argument("--attention-gpus", type=int, metavar="K",
                        help="attention GPUs of the split (default: cluster.attention_gpus)")


def _run_config(args: argparse.Namespace) -> Config:
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps: must be at least 1, got {args.steps}")
    if args.config is None:
        if not LOCAL_PRESET.is_file():
            raise UsageError(f"no --config given and the local preset {LOCAL_PRESET} is missing")
        args.config = str(LOCAL_PRESET)
    return _load_config(args)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _run_arguments(parser)
    parser.add_argument("--out", metavar="DIR",
                        help="run folder for metrics.jsonl and checkpoints (default: runs/<time>, or --resume's)")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run in DIR from its latest checkpoint, on --attention-gpus or its split")
    parser.add_argument("--emulate-compute", action="store_true",
                        help="replace each stage's arithmetic by a wait of its predicted duration at the "
                             "configured shapes (emulation.modelled_compute; see README, Emulation)")


def _train_config(args: argparse.Namespace) -> Config:
    """The validated config of a ``train`` command (nothing started yet)."""
    if args.resume is not None and args.config is None:
        # Continue the run with its own config unless another is given.
        args.config = str(Path(args.resume) / "config.yaml")
        if not Path(args.config).is_file():
            raise UsageError(f"--resume {args.resume}: no config.yaml there; is it a run folder?")
    if args.emulate_compute:
        args.overrides.append("emulation.modelled_compute=true")
    return _run_config(args)


def _train_run(args: argparse.Namespace) -> int:
    from ma_ray.train import train

    cfg = _train_config(args)
    out = Path(args.out or args.resume or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    resume = Path(args.resume) / "checkpoints" if args.resume else None
    last = train(cfg, out, args.steps, resume=resume, attention_gpus=args.attention_gpus)
    print(json.dumps({"out": str(out), **last}))
    return 0


# --- verify ----------------------------------------------------------------------------------

def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    _run_arguments(parser)
    parser.add_argument("--precision", choices=["fp64", "fp32", "bf16"], default="fp64",
                        help="arithmetic of both runs (default fp64: see README, Verification)")
    parser.add_argument("--rebalance", metavar="STEP:K[,STEP:K...]",
                        help="move to K attention GPUs before STEP (heads, experts and AdamW moments migrate)")


def _verify_run(args: argparse.Namespace) -> int:
    from ma_ray.verify import parse_rebalances, steps_to_verify, verify

    cfg = _run_config(args)
    rebalances = parse_rebalances(args.rebalance)
    steps = steps_to_verify(args.steps, rebalances)
    report = verify(cfg, args.attention_gpus, steps, args.precision, rebalances=rebalances)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


# --- status, rebalance -----------------------------------------------------------------------

def _job_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ControlConfig()
    parser.add_argument("--name", default=defaults.name, help=f"the job's control.name (default {defaults.name})")
    parser.add_argument("--namespace", default=defaults.namespace,
                        help=f"the job's control.namespace (default {defaults.namespace})")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or the local cluster)")


def _status_run(args: argparse.Namespace) -> int:
    from ma_ray.control.client import connect

    print(json.dumps(connect(args.name, args.namespace, args.address).status(), indent=1))
    return 0


def _rebalance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("attention_gpus", type=int, metavar="K", help="attention GPUs of the new split")
    _job_arguments(parser)


def _rebalance_run(args: argparse.Namespace) -> int:
    from ma_ray.control.client import connect

    print(json.dumps(connect(args.name, args.namespace, args.address).rebalance(args.attention_gpus)))
    return 0


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
    "status": ("show a running job's split, stage times, imbalance and policy", _job_arguments, _status_run),
    "rebalance": ("move a running job to K attention GPUs", _rebalance_arguments, _rebalance_run),
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
