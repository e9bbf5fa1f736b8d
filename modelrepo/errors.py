"""The one error type of the repository contract."""


class RepositoryError(Exception):
    """A repository operation that cannot be done: the message names the thing and the value."""
