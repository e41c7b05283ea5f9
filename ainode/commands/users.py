"""``ainode user add|list|password``: web UI accounts from the command line."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from sqlalchemy import select

from node.records import users
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
    password = actions.add_parser("password", help="set a new password (lifts a lock-out)")
    password.add_argument("username")
    password.add_argument("--password-env", metavar="VAR")
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
            if args.action == "add":
                users.add_user(session, args.username, _password(args), args.role, args.name)
                session.commit()
                print(f"user {args.username} ({args.role}) created")
                return 0
            user = session.scalar(select(User).where(User.username == args.username))
            if user is None:
                raise ValueError(f"no user {args.username!r}")
            users.set_password(user, _password(args))
            session.commit()
            print(f"password of {args.username} changed")
            return 0
    finally:
        node.close()
