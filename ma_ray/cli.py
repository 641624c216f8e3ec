"""The ``ma-ray`` command line: parse, call, print.

Subcommands register themselves in ``COMMANDS`` as (help, add_arguments, run); adding one
(train, verify, status, rebalance) is one function pair and one entry. Bad input of any kind --
a ConfigError, an unreadable file, an argument argparse rejects -- ends as one line
``ma-ray: error: <message>`` on stderr and exit code 2, without a traceback; a run that fails
while it runs ends the same way with exit code 1 (``ma_ray.errors``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, List, NoReturn, Optional, Tuple

from ma_ray.config import Config, ControlConfig, load
from ma_ray.errors import MaRayError, one_line

PROG = "ma-ray"
EXIT_USAGE = 2
EXIT_FAILED = 1  # a runtime failure: the input was fine


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
    # --attention-gpus K is settled here, the one place the command line's split enters: it
    # replaces cluster.attention_gpus and is the split validated (errors name --attention-gpus),
    # so a config's own split that K overrides cannot fail the command. Nothing below takes it.
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
    search = parser.add_argument_group(
        "layout search", "--search scores every layout of a cluster of --nodes nodes x cluster.gpus_per_node; "
        "link speeds from emulation.intra_node_gb_per_s / inter_node_gb_per_s, memory per GPU from "
        "memory.attention_gpu_budget_gb / moe_gpu_budget_gb (set them with --set)")
    search.add_argument("--search", action="store_true",
                        help="print the best layouts (replicas, split, micro-batches in flight, hierarchical, "
                             "compression) and the configured one")
    search.add_argument("--nodes", type=int, metavar="N", help="nodes of the cluster (default: cluster.num_nodes)")
    search.add_argument("--gpus", metavar="N|all", default="all",
                        help="GPUs to use, whole nodes (default: all)")
    search.add_argument("--top", type=int, default=10, metavar="N", help="rows to print (default 10; --json has all)")


def _plan_run(args: argparse.Namespace) -> int:
    if args.search:
        return _plan_search(args)
    for option, given in (("--nodes", args.nodes is not None), ("--gpus", args.gpus != "all")):
        if given:
            raise UsageError(f"{option}: only with --search")
    from ma_ray.parallel.report import plan_report

    cfg = _load_config(args)
    report = plan_report(cfg)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 0


def _plan_search(args: argparse.Namespace) -> int:
    if args.attention_gpus is not None:
        raise UsageError("--attention-gpus: not with --search, which chooses the split")
    if args.top < 1:
        raise UsageError(f"--top: must be at least 1, got {args.top}")
    gpus = None
    if args.gpus != "all":
        try:
            gpus = int(args.gpus)
        except ValueError:
            raise UsageError(f"--gpus: expected a number of GPUs or 'all', got {args.gpus!r}") from None
    cfg = _load_config(args)
    from ma_ray.comm.compression import CompressionSettings
    from ma_ray.comm.cross_node import every_reducer
    from ma_ray.parallel.search import format_table, search, to_dict

    reducers = every_reducer(CompressionSettings.of(cfg.comm))
    result = search(cfg, reducers, args.nodes, gpus)
    print(json.dumps(to_dict(result, cfg), indent=1) if args.json else format_table(result, cfg, args.top))
    return 0


# --- train -----------------------------------------------------------------------------------

LOCAL_PRESET = Path(__file__).resolve().parent.parent / "cluster" / "local-cpu.yaml"


def _run_arguments(parser: argparse.ArgumentParser, steps_help: str = "optimizer steps (default: "
                                                                           "train.num_train_steps)") -> None:
    """Options shared by the commands that run a job (train, verify)."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (default: cluster/local-cpu.yaml, the emulated 4 x 4 CPU preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set train.seq_length=32 (repeatable)")
    parser.add_argument("--steps", type=int, metavar="N", help=steps_help)
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
    _run_arguments(parser, steps_help="the run's length in optimizer steps, and its LR schedule's: sets "
                                      "train.num_train_steps (on --resume: the total, steps done included)")
    parser.add_argument("--out", metavar="DIR",
                        help="a new or empty run folder (default: runs/<time>-<job id>); to continue a run, --resume it")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run in DIR from its newest intact checkpoint, on --attention-gpus or "
                             "its split")
    parser.add_argument("--resume-step", type=int, metavar="N",
                        help="with --resume: continue from the checkpoint of step N instead")
    parser.add_argument("--emulate-compute", action="store_true",
                        help="replace each stage's arithmetic by a wait of its predicted duration at the "
                             "configured shapes (emulation.modelled_compute; see docs/emulation.md)")


def _train_config(args: argparse.Namespace) -> Config:
    """The validated config of a ``train`` command (nothing started yet). ``--steps N`` is
    ``train.num_train_steps``: the run's length and its LR schedule's, as torchtitan's
    ``--training.steps``."""
    if args.out is not None and args.resume is not None:
        raise UsageError("--out and --resume: give one (a resumed run writes into its own folder)")
    if args.resume_step is not None and args.resume is None:
        raise UsageError("--resume-step: needs --resume DIR")
    if args.resume is not None and args.config is None:
        # Continue the run with its own config unless another is given.
        args.config = str(Path(args.resume) / "config.yaml")
        if Path(args.resume).is_dir() and not Path(args.config).is_file():
            raise UsageError(f"--resume {args.resume}: no config.yaml there; is it a run folder?")
    if args.emulate_compute:
        args.overrides.append("emulation.modelled_compute=true")
    if args.steps is not None:
        args.overrides.append(f"train.num_train_steps={args.steps}")
    try:
        return _run_config(args)
    except MaRayError as exc:
        if args.steps is not None and str(exc).startswith("train.warmup_steps: "):
            # The schedule's warm-up must fit in the run: say how to shorten it too.
            raise UsageError(f"--steps {args.steps} (train.num_train_steps) is shorter than the LR warm-up: {exc}; "
                             f"set a shorter one too, e.g. --set train.warmup_steps={max(1, args.steps // 10)}") from None
        raise


def _train_run(args: argparse.Namespace) -> int:
    from ma_ray import run_folder

    if args.resume is not None:
        run_folder.check_resumable(Path(args.resume))
    elif args.out is not None:
        run_folder.check_new(Path(args.out))
    cfg = _train_config(args)
    from ma_ray.runtime.checkpoint import read_meta
    from ma_ray.train import resume_point, steps_done, train

    job_id = run_folder.new_job_id()
    if args.resume is not None:
        out, resume = Path(args.resume), Path(args.resume) / "checkpoints"
        done = steps_done(resume, args.resume_step)
        if done >= cfg.train.num_train_steps:
            print(f"{PROG}: {out} is already at step {done} (its latest checkpoint): nothing to train for "
                  f"a run of {cfg.train.num_train_steps} steps; give --steps N above {done} to go on")
            return 0
        resume = resume_point(resume, args.resume_step)
        if args.attention_gpus is None:  # the run goes on at its checkpoint's split
            cfg = cfg.with_split(read_meta(resume)["attention_gpus"])
    else:
        out, resume = Path(args.out) if args.out else run_folder.default_folder(job_id), None
    summary = train(cfg, out, job_id, resume=resume)
    print(summary["text"])
    return 0


# --- verify ----------------------------------------------------------------------------------

def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    _run_arguments(parser)
    parser.add_argument("--precision", choices=["fp64", "fp32", "bf16"], default="fp64",
                        help="arithmetic of both runs (default fp64: see docs/verification.md)")
    parser.add_argument("--rebalance", metavar="STEP:K[,STEP:K...]",
                        help="move to K attention GPUs before STEP (heads, experts and AdamW moments migrate)")


def _verify_run(args: argparse.Namespace) -> int:
    from ma_ray.verify import parse_rebalances, steps_to_verify, verify

    cfg = _run_config(args)
    rebalances = parse_rebalances(args.rebalance)
    steps = steps_to_verify(args.steps, rebalances)
    report = verify(cfg, steps, args.precision, rebalances=rebalances)
    print(json.dumps(report))
    return 1 if report["ok"] is False else 0  # None: inexact by design, and the report says why


# --- status, rebalance -----------------------------------------------------------------------

def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_dir", metavar="DIR", help="the job whose run folder is DIR (its job.json)")
    parser.add_argument("--name", help="the controller's actor name (ma-ray status lists them)")
    parser.add_argument("--namespace", help="the controller's namespace (default: any)")
    parser.add_argument("--job-id", metavar="ID", help="attach only if the job has this id")
    parser.add_argument("--address", help="Ray cluster address (default: job.json's, RAY_ADDRESS or the local cluster)")


def _attach(args: argparse.Namespace):
    """The client of the one job the arguments name (``control.client.connect``)."""
    from ma_ray.control.client import connect

    return connect(name=args.name, namespace=args.namespace, address=args.address, run=args.run_dir,
                   job_id=args.job_id)


def _status_run(args: argparse.Namespace) -> int:
    with _quiet_ray(args):
        client = _attach(args)
        print(json.dumps({"job_id": client.job_id, **client.status()}, indent=1))
    return 0


def _rebalance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("attention_gpus", type=int, metavar="K", help="attention GPUs of the new split")
    _job_arguments(parser)


def _rebalance_run(args: argparse.Namespace) -> int:
    with _quiet_ray(args):
        client = _attach(args)
        print(json.dumps({"job_id": client.job_id, **client.rebalance(args.attention_gpus)}))
    return 0


class _quiet_ray:
    """Around a command that attaches to a job: Ray's own stderr (its C++ core's retries and
    warnings) goes to a log file instead of the terminal, our one-line error still reaches the
    terminal, and the whole command is bounded: past three times ``control.connect_timeout_s``
    it ends with one line and exit 2, whatever Ray is waiting for."""

    def __init__(self, args: argparse.Namespace):
        self.where = args.address or (f"the run folder {args.run_dir}" if args.run_dir else "the cluster")
        self.limit_s = 3 * ControlConfig().connect_timeout_s
        self.log = Path(tempfile.gettempdir()) / f"ma-ray-client-{os.getuid()}.log"

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = os.dup(2)
        with open(self.log, "a") as log:
            os.dup2(log.fileno(), 2)
        self._stderr, sys.stderr = sys.stderr, os.fdopen(os.dup(self._saved), "w")
        self._timer = threading.Timer(self.limit_s, self._give_up)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _give_up(self) -> None:
        sys.stderr.write(f"{PROG}: error: no ma-ray job reachable at {self.where}: no answer within "
                         f"{self.limit_s:g} s (Ray's log: {self.log})\n")
        sys.stderr.flush()
        os._exit(EXIT_USAGE)

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # its goodbyes go to the log too
        self._timer.cancel()
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        sys.stderr.close()
        sys.stderr = self._stderr


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


def main(argv: Optional[List[str]] = None) -> int:
    code = EXIT_USAGE
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (UsageError, MaRayError) as exc:
        message = str(exc)
        code = EXIT_FAILED if isinstance(exc, RuntimeError) else EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (``ma-ray plan | head``): not an error of ours; silence the final
        # flush of stdout, which would fail the same way.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # an unreadable config file and the like
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    return code


def entry() -> NoReturn:
    """The ``ma-ray`` program: ``main``, then the process ends with its code
    (``runtime.cluster.exit_process`` once Ray has run in it)."""
    code = main()
    if "ray" not in sys.modules:
        sys.exit(code)
    from ma_ray.runtime.cluster import exit_process

    exit_process(code)


if __name__ == "__main__":
    entry()
