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
    app()
