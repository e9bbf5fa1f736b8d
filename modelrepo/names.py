"""Served names: what may name a model or adapter, so no name can leave the repository."""

import re

from modelrepo.errors import RepositoryError

# Like OpenAI and vLLM model ids, minus anything a path could use to escape: no "/", no "..".
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    """Return `name` if it is a safe served name, else raise a RepositoryError naming it."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RepositoryError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '..' or '/'"
        )
    return name
