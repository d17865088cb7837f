"""`adqueue serve`: the morning-review web app on the same database and data dir as the CLI."""

from __future__ import annotations

import ipaddress

import click

from adqueue.cli import cli, settings_from
from adqueue.cli.output import info
from adqueue.core.errors import ConfigError
from adqueue.jobs.context import Context


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@cli.command(epilog="""\b
Examples:
  adqueue serve                                   # http://127.0.0.1:8080/ on this machine
  adqueue serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"
      then open http://THIS-HOST:8080/?token=THE-TOKEN once from another machine
""")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. Anything but loopback needs --token.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token", envvar="ADQUEUE_SERVE_TOKEN", default=None, metavar="TOKEN",
              help="Require this token on every request: ?token=TOKEN once (then a cookie) or "
              "Authorization: Bearer TOKEN [env ADQUEUE_SERVE_TOKEN].")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, token: str | None) -> None:
    """Serve the morning review: jobs, each job's flagged images with heat maps, reviews
    (defect / false alarm) and precision, models with their metrics, and score trends with a
    drift warning. Reads the same database and data dir as every other verb; the only thing it
    writes is a review."""
    import uvicorn

    from adqueue.web.app import create_app
    from adqueue.web.auth import LOOPBACK_HOSTS

    token = (token or "").strip() or None
    if token is None and not is_loopback(host):
        raise ConfigError(f"--host {host} would show every result to the network without a password: "
                          "pass --token TOKEN (or set ADQUEUE_SERVE_TOKEN)")
    context = Context(settings_from(ctx, existing=True))
    context.store  # noqa: B018 - fail now, clearly, if the database is unreachable
    # Without a token only loopback names are accepted, so no web page can reach us through DNS rebinding.
    allowed = None if token else (*LOOPBACK_HOSTS, host.strip("[]").lower())
    app = create_app(context, token=token, allowed_hosts=allowed)
    shown = f"[{host}]" if ":" in host else host
    info(f"adqueue serve: http://{shown}:{port}/ on {context.store.safe_url}"
         + (" (append ?token=TOKEN once)" if token else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
