"""The ``forgetlab`` command. Each group of subcommands lives in its own module."""

from __future__ import annotations

import typer
from transformers.utils import logging as hf_logging

from forgetlab.cli import aggregate, analyze, biography, cit, fv, icl_world
from forgetlab.cli.errors import refuse_under_launcher

app = typer.Typer(help="Measure, explain and prevent forgetting in continual learning of language models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
hf_logging.disable_progress_bar()  # weight loading/saving bars drown the training log
app.add_typer(biography.app, name="biography")
app.add_typer(fv.app, name="fv")
app.add_typer(icl_world.app, name="icl-world")
app.add_typer(analyze.app, name="analyze")
app.add_typer(cit.app, name="cit")
app.command("aggregate")(aggregate.aggregate)


@app.callback()
def launch(ctx: typer.Context) -> None:
    """Several processes (torchrun): only the groups with a ``run`` that trains on several GPUs may start."""
    from forgetlab.train import distributed

    if distributed.launched() and ctx.invoked_subcommand not in ("cit", "biography"):
        refuse_under_launcher(ctx.invoked_subcommand)


def main() -> None:
    """The console script. A usage error (a missing or unknown option, a value of the wrong type) is one line on
    stderr with exit code 2, like every other bad input, instead of a usage box; help is shown as usual."""
    import sys

    from forgetlab.cli.errors import first_process

    # the click that typer runs on (recent typer versions carry their own copy), reached through public names
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = typer.main.get_command(app).main(prog_name="forgetlab", standalone_mode=False)
    except click_error as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare group: its help
            err.show()
        elif first_process():
            ctx = getattr(err, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print(f"forgetlab: error: {' '.join(err.format_message().split())}{where}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.Abort:
        print("forgetlab: aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
