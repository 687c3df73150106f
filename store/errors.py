"""ScoreloopError: the base of every error a user can act on (bad config, unknown ticker, a corrupt
adapter, a database that cannot be opened, ...).

The CLI catches this one class and prints its message as one line with exit code 1; anything else
is a bug and keeps its traceback. It lives in store/ because store is the floor every package may
import, and this module imports nothing.
"""


class ScoreloopError(Exception):
    """A typed error whose message says what went wrong and what to do; the CLI prints it as one line."""
