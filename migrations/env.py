"""Alembic runtime: adqueue passes an open connection in config.attributes["connection"].

`adqueue db upgrade` is the way in; plain `alembic` also works with -x url=... for experts.
"""

from alembic import context
from sqlalchemy import Connection, create_engine

from adqueue.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _configure_and_run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: run `adqueue db upgrade`, or alembic with -x url=DATABASE_URL")
    engine = create_engine(url)
    with engine.begin() as conn:
        _configure_and_run(conn)
