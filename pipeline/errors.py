"""The project's exceptions. Each names the file, image or tile and the bad value."""


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
