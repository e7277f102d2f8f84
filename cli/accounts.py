"""`neureg accounts --sql`: the SQL an administrator runs to create the lab's accounts (``upkeep.accounts``);
`neureg accounts --store-policy ROLE`: the S3 policy of a role (``upkeep.store_policy``)."""

from __future__ import annotations

import json
import sys

import datajoint as dj

from ..database.settings import STORE, Settings
from ..upkeep.accounts import (
    DEFAULT_LAB,
    DEFAULT_WORKER,
    accounts_sql,
    generate_passwords,
    parse_passwords,
    save_passwords,
)
from ..upkeep.store_policy import ROLES, store_policy
from .common import add_command, refuse


def cmd_store_policy(args) -> int:
    """Print the IAM policy (JSON) of one store role; bucket and location default to DataJoint's store
    'neureg' when it is an S3 bucket."""
    spec = dict((dj.config.stores or {}).get(STORE) or {})
    bucket = args.bucket or (spec.get("bucket") if spec.get("protocol") == "s3" else None)
    location = args.location if args.location is not None else spec.get("location", "")
    try:
        policy = store_policy(args.store_policy, bucket, location, login=args.login)
    except ValueError as exc:
        return refuse(exc)
    print(json.dumps(policy, indent=2))
    return 0


def cmd_accounts(args) -> int:
    """`neureg accounts --sql`: print the SQL an administrator runs to create the lab's accounts.

    MySQL/MariaDB SQL creating (or updating) accounts for the schemas under the prefix: lab members read
    everything and add scans but cannot update, delete or drop; workers fill the computed schemas. Without
    --lab/--worker: one of each, named neureg_lab and neureg_worker. Every account needs a password, there is
    no default: --password USER=VALUE (VALUE env:NAME reads environment variable NAME; repeatable), or
    --generate-passwords FILE writes a strong one for every account given none as USER=PASSWORD lines to a
    new FILE (mode 0600; an existing file is never overwritten)."""
    if args.store_policy:
        return cmd_store_policy(args)
    if not args.sql:
        return refuse(
            "say what to do: --sql prints the SQL (pipe it into `mysql` as an administrator), "
            "--store-policy ROLE the S3 policy of a role"
        )
    prefix = Settings.resolve(prefix=getattr(args, "prefix", None)).prefix
    try:
        passwords = parse_passwords(args.password)
    except ValueError as exc:
        return refuse(exc)
    lab, workers = args.lab or [], args.worker or []
    if not lab and not workers:
        lab, workers = [DEFAULT_LAB], [DEFAULT_WORKER]
    without = [u for u in lab + workers if u not in passwords]
    if without and args.generate_passwords:
        generated = generate_passwords(without)
        try:
            save_passwords(args.generate_passwords, generated)
        except OSError as exc:
            return refuse(
                f"{args.generate_passwords}: cannot write the generated passwords: {exc.strerror} "
                "(an existing file is never overwritten)"
            )
        passwords.update(generated)
        print(
            f"generated passwords for {', '.join(without)} written to {args.generate_passwords} (mode 0600)",
            file=sys.stderr,
        )
    try:
        sql = accounts_sql(prefix, lab, workers, passwords, host=args.host)
    except ValueError as exc:
        return refuse(exc)
    print(sql, end="")
    return 0


def register(sub) -> None:
    """Add the ``accounts`` command."""
    p = add_command(sub, cmd_accounts, "print SQL creating lab-member and worker accounts (MySQL)")
    p.add_argument("--sql", action="store_true", help="print the SQL (run it as a database administrator)")
    p.add_argument("--lab", action="append", metavar="USER", help="a lab-member account (repeatable)")
    p.add_argument("--worker", action="append", metavar="USER", help="a worker account (repeatable)")
    p.add_argument("--password", action="append", metavar="USER=VALUE", help="USER's password, or env:NAME")
    p.add_argument("--generate-passwords", metavar="FILE", help="generate the missing passwords into a new FILE")
    p.add_argument("--host", default="%", help="host part of the accounts (default '%%': any host)")
    p.add_argument("--store-policy", choices=ROLES, metavar="ROLE", help=f"print ROLE's S3 policy ({', '.join(ROLES)})")
    p.add_argument("--bucket", help="the store's bucket (default: DataJoint's store 'neureg')")
    p.add_argument("--location", help="the store's location in the bucket (default: DataJoint's store 'neureg')")
    p.add_argument("--login", help="a lab member's database login (default: the policy variable ${aws:username})")
