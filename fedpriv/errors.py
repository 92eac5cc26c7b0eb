"""The one exception type for mistakes a user can fix: its message says what to change."""


class FedprivError(Exception):
    """A bad setting, file or state that stops a run before it produces results."""
