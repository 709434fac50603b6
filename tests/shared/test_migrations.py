"""The migrations build exactly the models' schema, on SQLite and on PostgreSQL."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from shared.db import engine_for
from shared.models import Base


class TestMigrations:
    def test_upgrade_from_empty_creates_every_table(self, database_url):
        tables = set(inspect(engine_for(database_url)).get_table_names())
        assert tables == {table.name for table in Base.metadata.sorted_tables} | {"alembic_version"}

    def test_no_drift_between_models_and_migrated_schema(self, database_url):
        with engine_for(database_url).connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
