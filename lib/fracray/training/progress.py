"""Training progress on the driver's console without Ray's worker logs: the rank-0 worker of
each run posts one line per epoch to a named actor of the job, and the driver prints what is
new while it waits for the runs. Works the same on a laptop and on a cluster (the actor is
reached by name within the job's namespace)."""

from __future__ import annotations

from typing import Any

__all__ = ["BOARD_NAME", "open_board", "post_progress", "new_lines"]

BOARD_NAME = "fracray-training-progress"


class _Board:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def post(self, line: str) -> None:
        self.lines.append(line)

    def since(self, start: int) -> list[str]:
        return self.lines[start:]


def open_board() -> Any:
    """The job's progress board (created by the driver; a second call returns the same one)."""
    import ray

    return ray.remote(num_cpus=0)(_Board).options(name=BOARD_NAME, get_if_exists=True).remote()


def post_progress(line: str) -> None:
    """From a training worker: post ``line`` if the driver opened a board (else nothing)."""
    import ray

    try:
        ray.get_actor(BOARD_NAME).post.remote(line)
    except ValueError:  # no board: a run started outside train_all (tests, notebooks)
        pass


def new_lines(board: Any, seen: int) -> list[str]:
    import ray

    return ray.get(board.since.remote(seen))
