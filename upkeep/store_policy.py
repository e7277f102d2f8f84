"""S3 policies for the lab's roles: who may write which part of the object store.

The database's grants keep lab members from changing computed rows; the store needs the same line, or a
lab member's store keys could overwrite another scan's response blocks or a network's weights (every
read would notice, through the SHA-256 in the row, but nothing would prevent it). The store's sections:

- ``<location>/members/<login>/``: the response blocks of the scans ``<login>`` ingested (ingestion writes
  there, ``database.store.member_prefix``);
- the rest of ``<location>/``: computed arrays (``_schema/``), written by workers.

So a lab member may read everything and write and delete only in their own section; a worker may read,
write and delete everything under the location (results, and ``neureg gc``'s deletions) and create the
bucket; the administrator owns the bucket. The policies are IAM policy documents (AWS, MinIO and Ceph
read them): for a MinIO user named like the database login, the lab policy's ``${aws:username}`` names
each member's section; on servers without policy variables, pass the member's login.
"""

from __future__ import annotations

from ..database.store import MEMBERS, member_prefix

ROLES = ("lab", "worker", "admin")
OBJECT_WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")
BUCKET_READS = ("s3:ListBucket", "s3:GetBucketLocation")


def _arn(*parts: str) -> str:
    return "arn:aws:s3:::" + "/".join(part.strip("/") for part in parts if part.strip("/"))


def store_policy(role: str, bucket: str, location: str = "", login: str | None = None) -> dict:
    """The IAM policy document of ``role`` for the store ``bucket/location``.

    ``login`` names a lab member's section (their database login, as ingestion names it); without it the
    policy uses ``${aws:username}`` (one policy for every member whose store user is named as their login).
    """
    if role not in ROLES:
        raise ValueError(f"no store role {role!r}: choose one of {', '.join(ROLES)}")
    if not bucket:
        raise ValueError("the store policy needs the bucket's name (--bucket)")
    everything = _arn(bucket, location, "*")
    if role == "admin":
        statements = [{"Effect": "Allow", "Action": ["s3:*"], "Resource": [_arn(bucket), _arn(bucket, "*")]}]
    elif role == "worker":
        statements = [
            {"Effect": "Allow", "Action": [*BUCKET_READS, "s3:CreateBucket"], "Resource": [_arn(bucket)]},
            {"Effect": "Allow", "Action": ["s3:GetObject", *OBJECT_WRITES], "Resource": [everything]},
        ]
    else:
        section = member_prefix(login) if login else f"{MEMBERS}/${{aws:username}}"
        statements = [
            {"Effect": "Allow", "Action": list(BUCKET_READS), "Resource": [_arn(bucket)]},
            {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [everything]},
            {"Effect": "Allow", "Action": list(OBJECT_WRITES), "Resource": [_arn(bucket, location, section, "*")]},
        ]
    return {"Version": "2012-10-17", "Statement": statements}
