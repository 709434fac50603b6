"""API keys: created once, stored as a hash, checked in constant time."""

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import ApiKey, Project

TOKEN_PREFIX = "tny"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def project_named(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def create_key(session: Session, name: str, project_name: str = "default") -> str:
    """Store a new key for the project (made if missing) and return the token, shown only once."""
    project = project_named(session, project_name)
    secret = secrets.token_urlsafe(32)
    key = ApiKey(project_id=project.id, name=name, secret_sha256=_digest(secret))
    session.add(key)
    session.flush()
    return f"{TOKEN_PREFIX}_{key.id.removeprefix('key_')}_{secret}"


def authenticate(session: Session, token: str) -> ApiKey | None:
    """The key a token belongs to, or None. The token names its key row, so the secret is
    compared with `hmac.compare_digest` rather than by a database lookup on the secret."""
    prefix, _, rest = token.partition("_")
    key_suffix, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not key_suffix or not secret or len(token) > 200:
        return None
    key = session.get(ApiKey, f"key_{key_suffix}")
    # Compare even when the key is missing, so timing does not tell which key ids exist.
    expected = key.secret_sha256 if key is not None else _digest("")
    if not hmac.compare_digest(expected, _digest(secret)) or key is None:
        return None
    return key
