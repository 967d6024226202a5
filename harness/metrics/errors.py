"""The one error type of the metric layer's set-up checks."""

from __future__ import annotations


class MetricSetupError(ValueError):
    """A metric cannot be computed as asked: missing/bad weights, reference statistics or image size.

    The message is one line naming the problem and the command or option that fixes it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
