"""Alembic environment: the engine and the metadata both come from `shared`."""

from alembic import context

from shared.db import engine_for
from shared.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")

with engine_for(url).connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
