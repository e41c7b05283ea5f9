"""Web UI users: creation, password hashing and sign-in with a bound on failed attempts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from node.records.db import User, UserRole, utcnow

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10
# Checked against when the user does not exist, so a wrong name costs as long as a wrong
# password and timing does not tell which names exist.
_DUMMY_HASH = generate_password_hash("not a real password")


@dataclass(frozen=True)
class SignIn:
    """The outcome of a sign-in attempt: the user, or the message to show."""

    user: User | None
    message: str = ""


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
    """Replace the user's password and lift a lock-out."""
    user.password_hash = generate_password_hash(check_password(password))
    user.failed_logins, user.locked_until = 0, None


def authenticate(
    session: Session,
    username: str,
    password: str,
    max_failed: int = 5,
    lockout: timedelta = timedelta(minutes=15),
    now: datetime | None = None,
) -> SignIn:
    """Check a user name and password; after ``max_failed`` wrong passwords in a row the
    account is locked for ``lockout`` (the caller commits the counters)."""
    now = now or utcnow()
    user = session.scalar(select(User).where(User.username == username))
    if user is None or not user.active:
        check_password_hash(_DUMMY_HASH, password)
        return SignIn(None, "Wrong user name or password.")
    if user.locked_until is not None and user.locked_until > now:
        minutes = max(1, round((user.locked_until - now).total_seconds() / 60))
        return SignIn(None, f"Too many failed sign-ins: try again in {minutes} min.")
    if not check_password_hash(user.password_hash, password):
        user.failed_logins += 1
        if user.failed_logins >= max_failed:
            user.locked_until, user.failed_logins = now + lockout, 0
            minutes = round(lockout.total_seconds() / 60)
            return SignIn(None, f"Too many failed sign-ins: try again in {minutes} min.")
        return SignIn(None, "Wrong user name or password.")
    user.failed_logins, user.locked_until, user.last_login_at = 0, None, now
    return SignIn(user)
