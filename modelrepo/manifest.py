"""manifest.json: what a version was built from, how, how it validated, and a hash of every file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from modelrepo.errors import RepositoryError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20  # 1 MiB reads keep hashing a multi-GB .bin flat in memory


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(folder: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of every file below `folder` but the manifest, keyed by forward-slash relative path."""
    root = Path(folder)
    return {rel: sha256_file(root / rel) for rel in _files(root)}


def _files(root: Path) -> list[str]:
    """Every file below `root` but the manifest, as forward-slash relative paths."""
    return [
        p.relative_to(root).as_posix()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    ]


def json_object(data: bytes, where: str) -> dict[str, Any]:
    """Bytes that must hold a JSON object; anything else is a RepositoryError naming `where`."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RepositoryError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RepositoryError(f"{where} is not a JSON object")
    return body


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RepositoryError(f"{path.name} is missing in {path.parent}") from None
    return json_object(data, str(path))


def manifest_body(data: bytes, where: str) -> dict[str, Any]:
    body = json_object(data, where)
    if not isinstance(body.get("files"), dict):
        raise RepositoryError(f"{where} has no 'files' table of hashes")
    return body


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RepositoryError(f"{path} is missing") from None
    return manifest_body(data, str(path))


def verify_version(folder: str | os.PathLike[str]) -> list[str]:
    """Check every file against the manifest; return the problems found (empty: intact)."""
    root = Path(folder)
    try:
        expected: dict[str, str] = read_manifest(root)["files"]
    except RepositoryError as e:
        return [str(e)]
    problems = []
    for rel, digest in sorted(expected.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest")
    extra = sorted(set(_files(root)) - set(expected)) if not problems else []
    problems += [f"{rel}: not in the manifest" for rel in extra]
    return problems
