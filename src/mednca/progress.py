"""Long work as generators: they yield progress events and return their result.

A command line drives one with a progress bar, a viewer runs it in a worker thread and cancels it by closing
it, a test steps through it, and a script calls the plain function, which runs it to the end (as
stardist-napari does its prediction).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    stage: str


def run_to_end(gen: Generator[object, None, R], on_event: Callable[[object], None] | None = None) -> R:
    """Run ``gen`` to the end, handing each event to ``on_event``; return the generator's result."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)
