"""Local paths and s3:// URIs behind one small interface.

S3 uses the standard AWS credential chain. An S3-compatible store is reached by setting ``AWS_ENDPOINT_URL``
(boto3 and pyarrow both read it); ``MLFLOW_S3_ENDPOINT_URL`` is honoured as a fallback so that one variable
serves MLflow and the pipeline alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def is_s3(path: str) -> bool:
    """Whether ``path`` is an ``s3://`` URI."""
    return path.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://bucket/key`` URI, the key without leading or trailing slashes ("" for the
    bucket itself). Does not check the scheme: call it on URIs :func:`is_s3` accepts."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key.strip("/")


def endpoint_url() -> str | None:
    """The S3-compatible endpoint: ``AWS_ENDPOINT_URL``, else ``MLFLOW_S3_ENDPOINT_URL``, else None (AWS)."""
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None


def s3_client():
    """A boto3 S3 client on :func:`endpoint_url`, with the standard AWS credential chain."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url())


def pyarrow_filesystem(path: str):
    """The pyarrow filesystem for a path, for Ray Data reads/writes and Ray Train storage (None for local)."""
    if not is_s3(path):
        return None
    from pyarrow import fs

    endpoint = endpoint_url()
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host, "scheme": scheme}
    return fs.S3FileSystem(**kwargs)


def open_input(path: str):
    """A seekable binary file for a local path or an s3:// URI (a context manager)."""
    if is_s3(path):
        return pyarrow_filesystem(path).open_input_file(fs_path(path))
    return open(path, "rb")


def download_dir(uri: str, cache_root: str) -> str:
    """Download an s3:// prefix once into ``cache_root``; later calls reuse the local copy."""
    bucket, prefix = split_s3(uri)
    local = Path(cache_root) / hashlib.sha1(uri.encode()).hexdigest()[:16]
    done = local / ".complete"
    if done.exists():
        return str(local)
    client = s3_client()
    tmp = Path(tempfile.mkdtemp(dir=cache_root if os.path.isdir(cache_root) else None))
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1 :]
            if not rel or rel.endswith("/"):  # a "folder" marker object (pyarrow and Ray Train write them)
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
            count += 1
    if count == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{uri} holds no files: check the bucket and prefix, and AWS_ENDPOINT_URL for S3-compatible stores")
    (tmp / ".complete").write_text(str(count))
    local.parent.mkdir(parents=True, exist_ok=True)
    if not done.exists() and local.exists():  # a copy without its marker: broken, never in use
        shutil.rmtree(local, ignore_errors=True)
    try:
        os.replace(tmp, local)  # atomic: a half-finished download is never taken for a cached copy
    except OSError:
        if not done.exists():
            raise
    if done.exists():  # another job's copy landed first: it may be in use, so keep it and drop this one
        shutil.rmtree(tmp, ignore_errors=True)
    return str(local)


@contextlib.contextmanager
def replacing(path: str):
    """A temporary path of its own beside the local ``path``, for the caller to write; when the block ends without
    an exception it replaces ``path`` in one rename (readers see the old file or the new one, never part of one),
    and the temporary file is removed in any case. The name is unique per call, so writers of one file in other
    processes or threads never share a temporary file: the last rename wins."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")  # the writer creates it: the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a local path (atomically, flushed to disk: :func:`replacing`) or an s3:// URI (one PUT,
    atomic on S3)."""
    if is_s3(path):
        bucket, key = split_s3(path)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, payload: dict) -> None:
    """Write JSON to a local path or s3:// URI, atomically whoever else writes it (:func:`write_bytes`)."""
    write_bytes(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


class DamagedFile(ValueError):
    """A JSON file that exists but cannot be read as a JSON object (cut off mid-write, edited, overwritten)."""


def read_json(path: str) -> dict | None:
    """Read a JSON object from a local path or s3:// URI; None if it does not exist.

    Raises DamagedFile (a ValueError, so a job prints it as one line) when the file is not a JSON object.
    """
    if is_s3(path):
        bucket, key = split_s3(path)
        client = s3_client()
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
    elif os.path.isfile(path):
        body = Path(path).read_bytes()
    elif os.path.exists(path):
        raise DamagedFile(f"{path} is a folder where a JSON file belongs: remove it and run the step that writes it again")
    else:
        return None
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFile(f"{path} is damaged ({e}; cut off mid-write?): delete it and run the step that wrote it "
                          "again") from None
    if not isinstance(value, dict):
        raise DamagedFile(f"{path} holds a JSON {type(value).__name__}, not an object: delete it and run the step "
                          "that wrote it again")
    return value


def fs_path(uri: str) -> str:
    """A path on the uri's pyarrow filesystem: "bucket/key" for s3://, the absolute path for local."""
    return uri[len("s3://"):] if is_s3(uri) else os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    """``parts`` appended to ``base``: with "/" for an s3:// URI, with :func:`os.path.join` for a local path."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)
