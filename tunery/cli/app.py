"""The `tunery` command line: one thin verb per module, errors printed without a traceback.

    tunery --help
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

import tunery
from tunery.cli import chat, compare, data, demo, doctor, evaluate, export, jobs, models, plan, train, ui
from tunery.errors import TuneryError
from tunery.progress import console

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Fine-tune small open LLMs: data -> training -> eval -> export.")
app.command("train", help=train.HELP)(train.train_command())
app.add_typer(data.app, name="data")
app.command("eval")(evaluate.eval_command)
app.command("chat")(chat.chat_command)
app.command("export")(export.export_command)
app.command("demo")(demo.demo_command)
app.command("doctor")(doctor.doctor_command)
app.command("submit")(jobs.submit_command)
app.add_typer(jobs.app, name="jobs")
app.command("logs")(jobs.logs_command)
app.command("cancel")(jobs.cancel_command)
app.command("worker")(jobs.worker_command)
app.command("ui")(ui.ui_command)
app.command("models")(models.models_command)
app.command("plan")(plan.plan_command)
app.command("compare")(compare.compare_command)


def main() -> None:
    if "TOKENIZERS_PARALLELISM" not in os.environ:  # quiet: tokenizers warns when a process forks after using it
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tunery.DEFAULTED_ENV.add("TOKENIZERS_PARALLELISM")
    # a deprecation inside peft/transformers that users cannot act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes (which peft imports) tries at import to fetch an optional CPU 4-bit kernel from the Hub through
    # `kernels`, and warns when it cannot (offline, an untrusted publisher); its own CPU code serves instead
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        app()
    except TuneryError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
