"""The project's exceptions. Each names the file, image or tile and the bad value."""

import pickle


class SegpipeError(Exception):
    """Base class for every error segpipe raises on purpose."""


class InputError(SegpipeError, ValueError):
    """An input image is unreadable, corrupt, too large or not what it claims to be."""


class CheckpointError(SegpipeError, ValueError):
    """A checkpoint cannot be loaded safely or does not match the requested model."""


class ConfigError(SegpipeError, ValueError):
    """A run setting is invalid (usage error: the CLI exits with code 2)."""


class ClusterError(SegpipeError):
    """The Ray cluster cannot be joined, or cannot place the run's tile workers (the CLI
    exits with code 2)."""


def portable(exc: Exception) -> Exception:
    """The exception itself when it survives pickling to the driver, else a RuntimeError
    with its type and text (an exception whose __init__ takes other arguments does not)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
