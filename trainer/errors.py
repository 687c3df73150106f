"""The trainer's typed error: a round, an adapter or the offline set cannot be used as asked."""

from store.errors import ScoreloopError


class TrainerError(ScoreloopError, RuntimeError):
    """Training or publishing cannot go on; the message says why and what to do. Serving is untouched."""


class TrainingStopped(Exception):
    """The daemon is stopping: the round saved a checkpoint and stopped early; it resumes at the next start.

    Not a TrainerError: the run row stays `running` and nothing is published.
    """
