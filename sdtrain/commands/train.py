"""`sdtrain train CONFIG`: train an adapter (or, with --dry-run, explain the plan without loading weights)."""

from __future__ import annotations

NAME = "train"
HELP = "Train a DoRA/LoRA adapter from a TOML config."


def add_arguments(parser):
    parser.add_argument("config", help="TOML config file (see configs/ and docs/config.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=500 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="scan the data and print the plan (buckets, steps, adapted modules) without loading weights")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="latest|PATH",
                        help="resume from the newest training state in the output folder, or from PATH")
    parser.add_argument("--init-from", metavar="ADAPTER", default=None,
                        help="start from a trained adapter file (kohya/LyCORIS/OneTrainer layout) with a fresh optimizer")
    parser.add_argument("--dataset-config", metavar="FILE.toml", default=None,
                        help="a kohya dataset config ([[datasets]] / [[datasets.subsets]]) whose subsets replace the "
                             "config's [[data.subsets]]")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, plan output or notes")


def continue_command(args) -> str:
    """This command with `--resume latest` instead of --resume/--init-from/--dry-run: how to continue the run."""
    import shlex

    words = ["sdtrain", "train", args.config]
    for dest, value in vars(args).items():
        if dest in ("command", "_run", "config", "resume", "init_from", "dry_run") or value in (None, False, []):
            continue
        flag = "--set" if dest == "overrides" else "--" + dest.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            words += [flag] if item is True else [flag, str(item)]
    return shlex.join(words + ["--resume", "latest"])


def run(args) -> int:
    import os

    from sdtrain.config import load_config
    from sdtrain.console import note
    from sdtrain.train.loop import train

    notes: list[str] = []
    cfg = load_config(args.config, args.overrides, dataset_config=args.dataset_config, notes=notes)
    if not args.quiet and os.environ.get("RANK", "0") == "0":  # one copy of each note under a launcher
        for text in notes:
            note(text)
    if args.init_from:  # a missing, malformed or NaN/inf adapter fails here, before any model loads
        from sdtrain.export.adapter_file import load_adapter

        load_adapter(args.init_from)
    train(cfg, dry_run=args.dry_run, resume=args.resume, init_from=args.init_from, quiet=args.quiet,
          continue_command=continue_command(args))
    return 0
