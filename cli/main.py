"""The `composer` command: a thin typer app over the library packages."""

from __future__ import annotations

import typer

from cli.build_cmds import build
from cli.eval_cmds import eval_
from cli.expert_cmds import expert_app
from cli.registry_cmds import keys_app, registry_app
from cli.serve_cmds import serve
from cli.sweep_cmds import sweep

app = typer.Typer(
    help="Composer: declarative composition of modular experts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(registry_app, name="registry")
app.add_typer(keys_app, name="keys")
app.add_typer(expert_app, name="expert")
app.command("build")(build)
app.command("eval")(eval_)
app.command("sweep")(sweep)
app.command("serve", context_settings={"allow_extra_args": True})(serve)


if __name__ == "__main__":
    app()
