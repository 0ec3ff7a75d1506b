"""Callbacks the test suites share."""

from diverse.app.loop import Callback


class Interrupt(Callback):
    """Raise ``KeyboardInterrupt`` after global step ``at`` (a run killed mid-training)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, step, result):
        if step == self.at:
            raise KeyboardInterrupt
