"""The trainer's typed error: a round, an adapter or the offline set cannot be used as asked."""


class TrainerError(RuntimeError):
    """Training or publishing cannot go on; the message says why and what to do. Serving is untouched."""
