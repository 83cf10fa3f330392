"""The one error type every adapter-package check raises."""


class PackageError(ValueError):
    """An adapter package that is refused; the message says what is wrong in one line."""


class DamagedFiles(PackageError):
    """The package's files are not those its manifest lists (missing, extra, another size or hash, cut
    short): a copy damaged after it was made, which a good copy of the same package replaces."""


class ForeignSignature(PackageError):
    """The package is signed for another chain or registry (or in the old, unbound format): it may be
    fine elsewhere, but this registry cannot vouch for it."""


class StoreFull(RuntimeError):
    """The store cannot take a fetched package: its cache of fetched adapters is at its bound, or the disk at its
    floor, and nothing it may evict is old enough. Not the package's fault, nor its provider's."""


def shown(value: object, limit: int = 64) -> str:
    """A value from a package, for a message: repr'd (so no newline or control character can split the
    one-line error) and cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
