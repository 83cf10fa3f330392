"""The one error type every adapter-package check raises."""


class PackageError(ValueError):
    """An adapter package that is refused; the message says what is wrong in one line."""
