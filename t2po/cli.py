"""The `t2po` command line.

    t2po train [PRESET] [section.key=value ...]     train (default preset: the CPU main job)
    t2po train --resume RUN_DIR [key=value ...]     continue a run from its last complete checkpoint
    t2po envs                                       list environments
    t2po presets [NAME]                             list config presets, one line each (NAME: its description)
    t2po serve-retriever [--corpus FILE] [--port N] Search QA retrieval server (127.0.0.1)
    t2po webshop-server [--port N]                  the WebShop human view (127.0.0.1)
    t2po eval ENV [MODEL] [--api-base URL --model NAME]  evaluate a run, model folder or API model
    t2po serve [MODEL] [--port N]                   OpenAI-compatible /v1/chat/completions on 127.0.0.1
    t2po rft collect ENV --out FILE                 keep successful episodes (expert or model) as SFT data
    t2po sft DATA --out DIR                         multi-turn SFT; `t2po train model.path=DIR` starts from it
    t2po report RUN [RUN ...] [--out DIR] [--mlflow] plots + summary table, compare runs and seeds
    t2po export RUN_OR_CHECKPOINT --out DIR         a merged Hugging Face model folder (+ the LoRA adapter)

Every command reports an expected error (a bad config value, a missing file or folder, an unreachable
server, bad data) as one line naming the fix, with exit status 2 and no traceback (`T2PO_DEBUG=1`
shows it); a training run that fails while it sets up leaves no run folder behind. A server that stops
answering in the middle of `t2po eval` is exit status 3 (finished episodes kept); an internal bug is 1,
with its traceback. Output paths follow the path rule of `t2po/paths.py` (README, Reliability).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback

from t2po.errors import UserError

TRAIN_HELP = """\
Train an agent with T2PO or a baseline.

  t2po train                                  the main job: SmolLM2-135M-Instruct, T2PO on Sokoban, CPU
  t2po train grpo                             the same with GRPO (presets: gigpo, grpo, rloo, ppo, ...)
  t2po train alfworld-cpu algo.name=gigpo     any preset plus dotted overrides
  t2po train --resume runs/sokoban-t2po-...   continue a run after a stop or a kill

PRESET is a name from `t2po presets` (files in t2po/configs/) or a path to a YAML file. Overrides are
section.key=value with YAML values (rollout.group_size=8, env.options.dim_room=[6,6], model.path=null).
`--print-config` prints the resolved configuration (preset + overrides) as YAML and exits, writing
nothing; `--help-config` lists every key with that value, the code default where it differs, and its
meaning.
"""


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="t2po train", description=TRAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="[PRESET] [section.key=value ...]")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue this run folder from its last complete checkpoint")
    parser.add_argument("--help-config", action="store_true",
            help="list every configuration key with the preset's value (with the overrides) and its help, then exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML (a preset file) and exit; nothing is written")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    ns = parser.parse_args(argv)

    from t2po.config import describe_config, load_config

    preset = None
    overrides = []
    for a in ns.args:
        if "=" in a:
            overrides.append(a)
        elif preset is None:
            preset = a
        else:
            parser.error(f"unexpected argument {a!r}: give one preset and then section.key=value overrides")
    if ns.help_config or ns.print_config:
        from t2po.config import load_run_config

        try:
            cfg = load_run_config(ns.resume, overrides) if ns.resume else load_config(preset, overrides)
        except (UserError, FileNotFoundError) as e:
            print(f"t2po train: {e}", file=sys.stderr)
            return 2
        if ns.help_config:
            print(describe_config(cfg))
        else:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from t2po.config import load_run_config
    from t2po.trainer.trainer import Trainer

    try:
        if ns.resume:
            if preset:
                parser.error("--resume takes the run folder's own config; give only key=value overrides")
            cfg = load_run_config(ns.resume, overrides)
            trainer = Trainer(cfg, run_dir=ns.resume, resume=True, quiet=ns.quiet)
            if overrides:
                import yaml

                from t2po.checkpoints import atomic_write_text

                atomic_write_text(trainer.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        else:
            cfg = load_config(preset, overrides)
            trainer = Trainer(cfg, quiet=ns.quiet)
    except (UserError, FileNotFoundError) as e:
        print(f"t2po train: {e}", file=sys.stderr)
        return 2
    from t2po.tracking import run_status

    # SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: checkpoints stay whole, the MLflow run ends KILLED
    previous = signal.signal(signal.SIGTERM, _interrupt)
    error: BaseException | None = None
    try:
        trainer.setup()
        trainer.train()
    except BaseException as e:  # reported here, while the console still goes into train.log
        error = e
        if isinstance(e, KeyboardInterrupt):
            print(f"t2po train: stopped ({str(e) or 'Ctrl-C'}); continue with: t2po train --resume {trainer.run_dir}",
                  file=sys.stderr, flush=True)
        elif isinstance(e, user_errors()) and not os.environ.get("T2PO_DEBUG"):  # one line: the message names the fix
            print(f"t2po train: {e}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
    finally:
        trainer.cleanup(run_status(error))
        signal.signal(signal.SIGTERM, previous)
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, user_errors()):
        return 2
    return 1 if error is not None else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _envs(argv: list[str]) -> int:
    from t2po.envs import get_env_class, list_envs

    for name in list_envs():
        try:
            cls = get_env_class(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        except Exception as e:  # an environment whose optional dependency is missing still gets listed
            doc = f"(unavailable: {e})"
        print(f"{name:<12} {doc}")
    return 0


def _presets(argv: list[str]) -> int:
    import shutil
    import textwrap

    from t2po.config import ConfigError, list_presets, preset_description

    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    if argv and argv[0] not in ("-h", "--help"):  # one preset, its whole description
        try:
            paragraphs = preset_description(argv[0])
        except FileNotFoundError:
            from t2po.suggest import did_you_mean

            raise ConfigError(f"unknown preset {argv[0]!r}{did_you_mean(argv[0], list_presets())}; `t2po presets` "
                              "lists them") from None
        for paragraph in paragraphs:
            print(textwrap.fill(paragraph, width=width) + "\n")
        print(f"`t2po train {argv[0]} --print-config` shows every value it sets.")
        return 0
    for name in list_presets():  # one line each: the first sentence of its description
        first = next(iter(preset_description(name)), "")
        first = first.split(". ")[0].rstrip(".")
        print(f"{name:<22}{textwrap.shorten(first, width=width - 22, placeholder='...')}")
    print("\n`t2po presets NAME` describes one. A preset is a YAML file; `t2po train PATH.yaml` takes one from "
          "anywhere (`base: NAME` extends a packaged one).")
    return 0


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the input is wrong", not "t2po has a bug": reported as one line.
    `UserError` (t2po/errors.py) is every expected error t2po raises, its message naming the fix; the
    file-system errors are a path the user gave that is missing, taken or not readable. Any other
    exception (a ValueError from the algorithm layer, an ImportError inside t2po) keeps its traceback."""
    return (UserError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def _delegate(module: str) -> callable:
    def run(argv: list[str]) -> int:
        return int(importlib.import_module(module).main(argv) or 0)

    return run


COMMANDS = {
    "train": (_train, "train an agent (T2PO or a baseline)"),
    "envs": (_envs, "list environments"),
    "presets": (_presets, "list configuration presets"),
    "serve-retriever": (_delegate("t2po.envs.search.server"), "serve the Search QA retrieval index over HTTP"),
    "webshop-server": (_delegate("t2po.envs.webshop.web"), "serve the WebShop human view over HTTP"),
    "rft": (_delegate("t2po.rft"), "cold start: `t2po rft collect ENV` keeps successful episodes as SFT data"),
    "sft": (_delegate("t2po.sft"), "multi-turn SFT on collected conversations"),
    "eval": (_delegate("t2po.evaluate"), "evaluate a checkpoint, model directory or API model on held-out tasks"),
    "serve": (_delegate("t2po.serve"), "serve a model or checkpoint through an OpenAI-compatible API (127.0.0.1)"),
    "report": (_delegate("t2po.report"), "plots and a summary table of runs; compares seeds and configurations"),
    "export": (_delegate("t2po.export"),
               "a trained policy as a Hugging Face model folder (merged) and its LoRA adapter"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: t2po COMMAND [ARGS]\n\ncommands:")
        for name, (_, help) in COMMANDS.items():
            print(f"  {name:<17} {help}")
        print("\n`t2po COMMAND --help` explains each command. Main job: `t2po train`.")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        from t2po.suggest import closest

        near = closest(cmd, COMMANDS)
        hint = f" Did you mean {near!r}?" if near else ""
        print(f"t2po: unknown command {cmd!r}.{hint} Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd][0](rest)
    except user_errors() as e:
        if os.environ.get("T2PO_DEBUG"):
            raise
        message = str(e) or type(e).__name__
        print(f"t2po {cmd}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
