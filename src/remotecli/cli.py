"""The command line: ``remotecli up | gateway | controller | user | image``.

Nothing else in the package reads ``sys.argv``. Each command turns its options into a
configuration value and hands it to the role that runs it; errors under
:class:`~remotecli.exceptions.RemoteCliError` are printed as one line naming the cause and the
next step, with exit status 2 for bad configuration and 1 otherwise.
"""

from __future__ import annotations

import sys

import click

from remotecli import __version__
from remotecli.exceptions import ConfigError, RemoteCliError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="remotecli")
def cli() -> None:
    """Give people an isolated machine running a command-line tool, shown live in the browser.

    Start with `remotecli up`: it runs the gateway and the controller on this machine and prints
    the dashboard URL with a login token.
    """


# --- remotecli gateway -------------------------------------------------------------------------
# (owned by the gateway: src/remotecli/gateway/)


# --- remotecli up / controller / user ------------------------------------------------------------
# (owned by the controller: src/remotecli/controller/)


# --- remotecli image ----------------------------------------------------------------------------
# (owned by the microVM image builder: src/remotecli/images/)


def main() -> None:
    """Run the command line; print RemoteCliError as one line instead of a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    except RemoteCliError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
