"""``ainode user add|list|password|disable|enable``: web UI accounts from the command line.

Every change is written to the audit trail as ``cli:<system user>`` (no client address).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.records import audit, sign_in, users
from node.records.db import User, UserRole
from node.runtime import build_node


def register(sub) -> dict:
    """Add the ``user`` command."""
    user = sub.add_parser("user", help="web UI accounts")
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create an account")
    add.add_argument("username")
    add.add_argument("--role", choices=[r.value for r in UserRole], default="radiologist")
    add.add_argument("--name", default="", help="full name shown in the UI")
    add.add_argument(
        "--password-env", metavar="VAR", help="read the password from this environment variable"
    )
    actions.add_parser("list", help="list accounts")
    password = actions.add_parser(
        "password", help="set a new password (lifts the account's sign-in delays)"
    )
    password.add_argument("username")
    password.add_argument("--password-env", metavar="VAR")
    disable = actions.add_parser("disable", help="stop an account from signing in")
    disable.add_argument("username")
    enable = actions.add_parser("enable", help="let a disabled account sign in again")
    enable.add_argument("username")
    return {"user": cmd_user}


def _password(args: argparse.Namespace) -> str:
    if args.password_env:
        value = os.environ.get(args.password_env)
        if not value:
            raise ValueError(f"environment variable {args.password_env} is empty or unset")
        return value
    if not sys.stdin.isatty():
        raise ValueError("no terminal to ask for the password: use --password-env VAR")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise ValueError("the two passwords differ")
    return first


def cmd_user(settings, args: argparse.Namespace) -> int:
    """Run one ``ainode user`` action."""
    node = build_node(settings, migrate=True)
    try:
        with node.session_factory() as session:
            if args.action == "list":
                for user in session.scalars(select(User).order_by(User.username)):
                    state = "active" if user.active else "disabled"
                    print(f"{user.username:20} {user.role:12} {state:8} {user.full_name}")
                return 0
            print(_change(session, args))
            session.commit()
            return 0
    finally:
        node.close()


def _change(session: Session, args: argparse.Namespace) -> str:
    """Make one account change and its audit event; the line to print."""
    who = audit.command_line_user()
    if args.action == "add":
        users.add_user(session, args.username, _password(args), args.role, args.name)
        audit.record(session, who, "user_add", user=args.username, role=args.role)
        return f"user {args.username} ({args.role}) created"
    user = session.scalar(select(User).where(User.username == args.username))
    if user is None:
        raise ValueError(f"no user {args.username!r}")
    if args.action == "password":
        users.set_password(user, _password(args))
        sign_in.forget(session, username=user.username)
        audit.record(session, who, "user_password", user=user.username)
        return f"password of {args.username} changed"
    user.active = args.action == "enable"
    audit.record(session, who, f"user_{args.action}", user=user.username)
    return f"user {args.username} {args.action}d"
