"""The `skillpipe` command: one sub-command per stage, each a thin module in `stages/`."""

from __future__ import annotations

import functools
import inspect
import re
import sys
import warnings
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.cache import CacheError
from pipeline.config import ConfigError, flag_for
from pipeline.distributed import MainRankFailed
from pipeline.extraction import ExtractConfig
from pipeline.finetune import FinetuneConfig
from pipeline.head_training import FitHeadConfig, TrainingDiverged
from pipeline.takes import AnnotationError
from stages import demo, evaluate, export, extract, finetune, fit_head, status

USAGE_ERROR = 2  # bad flags, config or annotations: nothing was computed
FAILED = 1
USER_ERRORS = (ConfigError, CacheError, AnnotationError, FileNotFoundError, TrainingDiverged)
INTERRUPTED = 130  # as a shell reports a process stopped by Ctrl-C (128 + SIGINT)
# what an interrupted stage kept, and how to go on
ON_INTERRUPT = {
    "extract": "the shards committed so far are kept; the same command goes on from there",
    "fit-head": "the cells finished so far are kept; the same command with --resume trains only the others",
    "finetune": "the last finished epoch's checkpoint is kept; the same command with --resume goes on from it",
}

STAGE_CONFIGS = {config.__name__: config for config in (ExtractConfig, FitHeadConfig, FinetuneConfig)}

app = typer.Typer(
    help="Skill-level estimation from multi-view EgoExo4D video: extract features, fit heads, fine-tune.\n\n"
         "In order: extract (--split train, then --split val, into one cache); status (what the cache holds); "
         "fit-head (fusion heads on the cached features, a grid at once); finetune (LoRA end to end from the videos); "
         "evaluate and predict (a fit-head cell or finetune run, from videos); export (the cache as HDF5). "
         "demo runs the whole pipeline on generated data (demo-data writes that data alone).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def with_flags(message: str) -> str:
    """A config error's `FitHeadConfig.fusions` (the field, as a config file spells it) preceded by the flag that sets
    it: `--fusion (FitHeadConfig.fusions)`."""
    def labelled(match: re.Match) -> str:
        config = STAGE_CONFIGS.get(match[1])
        flag = config and flag_for(config, match[2])
        return f"{flag} ({match[0]})" if flag else match[0]

    return re.sub(r"\b(\w+Config)\.(\w+)", labelled, message)


def _reporting_user_errors(command: Callable, name: str) -> Callable:
    """Turn a user's mistake into one clear message and exit code 2 instead of a traceback; Ctrl-C into a line saying
    what was kept (exit 130)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            kept = ON_INTERRUPT.get(name)
            Console(stderr=True, soft_wrap=True).print(f"interrupted{': ' + kept if kept else ''}", highlight=False)
            raise typer.Exit(INTERRUPTED) from None
        except (*USER_ERRORS, MainRankFailed) as err:
            # the message is text (paths may hold brackets), never rich markup
            message = with_flags(str(err)) if isinstance(err, ConfigError) else str(err)
            Console(stderr=True, soft_wrap=True).print("[bold red]error:[/] " + escape(message), highlight=False)
            # rank 0 printed its own traceback for a MainRankFailed: the other ranks say one line each
            raise typer.Exit(FAILED if isinstance(err, MainRankFailed) else USAGE_ERROR) from None

    return wrapper


def register(name: str, command: Callable) -> None:
    # a docstring's line breaks joined (typer would print them where they fall); paragraphs kept
    help_text = re.sub(r"(?<!\n)\n(?!\n)", " ", inspect.cleandoc(command.__doc__ or ""))
    app.command(name, help=help_text)(_reporting_user_errors(command, name))


# listed in --help in the order a run takes them
register("extract", extract.extract)
register("status", status.status)
register("fit-head", fit_head.fit_head)
register("finetune", finetune.finetune)
register("evaluate", evaluate.evaluate)
register("predict", evaluate.predict)
register("export", export.export)
register("demo", demo.demo)
register("demo-data", demo.demo_data)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as the stages' other messages: what happened, not the Python file and line that said it."""
    return f"warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _one_line_warning
    sys.exit(app())


if __name__ == "__main__":
    main()
