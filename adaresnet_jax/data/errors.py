"""The data package's one exception, in a module of its own so that every part (host loaders, downloads,
on-device transforms) can raise it without importing another part."""


class DataError(ValueError):
    """Bad or missing data; the message says what was wrong and what to do."""
