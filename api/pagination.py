"""Cursor pagination, newest first: ids sort by creation time, so `after` is just an id."""

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from shared.schemas import ListRead


def newest_first(
    session: Session,
    statement: Select[Any],
    id_column: InstrumentedAttribute[str],
    limit: int,
    after: str | None,
) -> tuple[list[Any], bool]:
    """One page of rows and whether more follow."""
    if after is not None:
        statement = statement.where(id_column < after)
    rows = list(session.scalars(statement.order_by(id_column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_of(items: list[Any], has_more: bool) -> ListRead[Any]:
    return ListRead[Any](data=items, has_more=has_more)
