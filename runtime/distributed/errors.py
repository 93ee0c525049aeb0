"""The one error of the tensor-parallel group (no torch import: the engine catches it by type)."""


class TensorParallelError(RuntimeError):
    """A collective failed or timed out, or a rank exited: the group cannot run another step.
    The engine treats it as fatal (every request is aborted and a server shuts down)."""

    fatal = True  # NOTE: the scheduler never retries a fatal error row by row (runtime/scheduler/scheduler.py)
