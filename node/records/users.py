"""Web UI users: creation, password hashing and the password check of a sign-in."""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from node.records.db import User, UserRole, utcnow

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10
# Checked against when the user does not exist, so a wrong name costs as long as a wrong
# password and timing does not tell which names exist.
_DUMMY_HASH = generate_password_hash("not a real password")


def check_password(password: str) -> str:
    """A password long enough to be one."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


def add_user(
    session: Session, username: str, password: str, role: str = UserRole.RADIOLOGIST,
    full_name: str = "",
) -> User:  # fmt: skip
    """Create a user (the caller commits); a taken name or a bad role is a ValueError."""
    if not USERNAME.match(username):
        raise ValueError(
            f"user name {username!r}: 1-64 letters, digits, '.', '_', '@', '-' "
            "(starting with a letter or digit)"
        )
    if role not in tuple(UserRole):
        raise ValueError(f"role must be one of {', '.join(UserRole)}, got {role!r}")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise ValueError(f"user {username!r} already exists")
    user = User(
        username=username,
        full_name=full_name,
        password_hash=generate_password_hash(check_password(password)),
        role=role,
    )
    session.add(user)
    session.flush()
    return user


def set_password(user: User, password: str) -> None:
    """Replace the user's password (the caller also forgets the user's sign-in delays:
    :func:`node.records.sign_in.forget`)."""
    user.password_hash = generate_password_hash(check_password(password))


def authenticate(
    session: Session, username: str, password: str, now: datetime | None = None
) -> User | None:
    """The active user with this name and password, or None.

    A hash is always verified (the dummy one for an unknown or disabled user), so the time
    an answer takes does not tell which names exist; throttling is
    :mod:`node.records.sign_in`'s. The caller commits ``last_login_at``.
    """
    user = session.scalar(select(User).where(User.username == username))
    if user is None or not user.active:
        check_password_hash(_DUMMY_HASH, password)
        return None
    if not check_password_hash(user.password_hash, password):
        return None
    user.last_login_at = now or utcnow()
    return user
