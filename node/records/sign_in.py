"""Sign-in throttling: failed attempts slow down an attacker without locking anyone out.

Design (issue 14; replaces a per-account lock-out that let anyone lock any account, admin
included, with five guesses, and that told who exists):

- **Per client address.** Each attempt from an address is counted; after
  ``free_failures`` (default 5) the address must wait before its next attempt, a delay
  that doubles with every further failure (1 s, 2 s, 4 s …, at most ``max_delay``,
  default 15 min). Attempts inside the delay are answered 429 with Retry-After and are not
  checked at all. Guessing from one address is slowed to a handful per hour.
- **Per user name**, for spread-out attacks: attempts on one user name from addresses that
  have never signed in as that user are counted too, with more free failures
  (``account_free_failures``, default 20) and the same doubling delays. An address the
  user has signed in from before (the audit trail says so) is exempt from this account
  delay, so an attacker cannot keep the owner out from their usual workstation; nothing
  ever locks an account for longer than ``max_delay``.
- **No user enumeration.** User names are counted whether they exist or not, so the
  answers (401 or 429, the same page text) never depend on it, and the password check
  always verifies a hash (``node.records.users``).
- **Atomic counting.** An attempt is counted *before* its password is checked, by one
  ``INSERT … ON CONFLICT DO UPDATE SET failures = failures + 1`` per key, committed at
  once: parallel attempts are each counted, and none slips through as a free one. A
  successful sign-in forgets both counters; counters idle for ``forget_after`` (a day)
  start again from zero.

Behind a NAT or a proxy many people share one address: set ``web_trusted_proxy`` so the
node sees the real client addresses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from node.records.db import SignInThrottle, utcnow
from node.settings import Settings

ADDRESS, ACCOUNT = "address", "account"


@dataclass(frozen=True)
class Policy:
    """How many failures are free and how long the delays after them grow."""

    free_failures: int = 5
    account_free_failures: int = 20
    base_delay: timedelta = timedelta(seconds=1)
    max_delay: timedelta = timedelta(minutes=15)
    forget_after: timedelta = timedelta(days=1)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            free_failures=settings.web_sign_in_free_failures,
            account_free_failures=settings.web_sign_in_account_free_failures,
            max_delay=timedelta(seconds=settings.web_sign_in_max_delay_seconds),
        )

    def delay(self, failures: int, free: int) -> timedelta:
        """The wait after ``failures`` counted attempts of which ``free`` cost nothing."""
        if failures < free:
            return timedelta(0)
        doublings = min(failures - free, 40)  # 2**40 s is far past any max_delay
        return min(self.base_delay * 2**doublings, self.max_delay)


@dataclass(frozen=True)
class Throttled:
    """An attempt refused unchecked: which counter refused it and for how long."""

    scope: str  # ADDRESS or ACCOUNT
    retry_after: int  # whole seconds


def address_key(address: str) -> str:
    return f"address:{address}"


def account_key(username: str) -> str:
    return f"user:{username}"


def claim_attempt(
    session: Session,
    policy: Policy,
    address: str,
    username: str,
    known_address: bool,
    now: datetime | None = None,
) -> Throttled | None:
    """Count a sign-in attempt before its password is checked.

    Returns None when the attempt may go ahead (the caller commits at once, then checks
    the password), or why it must wait (nothing counted: the caller rolls back).
    ``known_address``: ``username`` has signed in from ``address`` before, so the per-user
    counter does not apply.
    """
    now = now or utcnow()
    session.execute(
        delete(SignInThrottle).where(
            SignInThrottle.last_failure_at < now - policy.forget_after,
            or_(SignInThrottle.blocked_until.is_(None), SignInThrottle.blocked_until <= now),
        )
    )
    counters = [(ADDRESS, address_key(address), policy.free_failures)]
    if not known_address:
        counters.append((ACCOUNT, account_key(username), policy.account_free_failures))
    for scope, key, free in counters:
        failures = _count(session, key, now, now - policy.forget_after)
        if failures is None:
            blocked_until = session.scalar(
                select(SignInThrottle.blocked_until).where(SignInThrottle.key == key)
            )
            wait = (blocked_until - now).total_seconds() if blocked_until else 1
            return Throttled(scope, max(1, math.ceil(wait)))
        wait = policy.delay(failures, free)
        if wait:
            session.execute(
                update(SignInThrottle)
                .where(SignInThrottle.key == key)
                .values(blocked_until=now + wait)
            )
    return None


def _count(session: Session, key: str, now: datetime, forget_before: datetime) -> int | None:
    """Add one to ``key``'s failures in one statement; None when ``key`` must still wait."""
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    table = SignInThrottle.__table__
    statement = (
        insert(table)
        .values(key=key, failures=1, last_failure_at=now, blocked_until=None)
        .on_conflict_do_update(
            index_elements=[table.c.key],
            set_={
                "failures": case(
                    (table.c.last_failure_at < forget_before, 1), else_=table.c.failures + 1
                ),
                "last_failure_at": now,
            },
            where=or_(table.c.blocked_until.is_(None), table.c.blocked_until <= now),
        )
        .returning(table.c.failures)
    )
    return session.execute(statement).scalar_one_or_none()


def forget(session: Session, address: str | None = None, username: str | None = None) -> None:
    """Clear the counters of ``address`` and ``username`` (a successful sign-in, a new
    password set by an administrator). Caller commits."""
    keys = [address_key(address)] if address is not None else []
    keys += [account_key(username)] if username is not None else []
    session.execute(delete(SignInThrottle).where(SignInThrottle.key.in_(keys)))


def account_delayed_until(session: Session, username: str, now: datetime | None = None):
    """Until when attempts on ``username`` from new addresses must wait (None: no wait)."""
    until = session.scalar(
        select(SignInThrottle.blocked_until).where(SignInThrottle.key == account_key(username))
    )
    return until if until is not None and until > (now or utcnow()) else None
