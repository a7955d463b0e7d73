"""Errors that end a phase, each with the exit code Kubernetes acts on.

The Jobs' `podFailurePolicy` fails the whole Job at once on exit codes 2 and 3
(retrying cannot fix a bad config or bad data) and lets any other non-zero exit
be retried, since that is what preemption, OOM kills and flaky storage look like.
"""

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_CONFIG = 2
EXIT_INPUT = 3


class PipelineError(Exception):
    """Base of the errors we raise on purpose; the message is printed as one line."""

    exit_code = EXIT_RETRYABLE


class ConfigError(PipelineError):
    """A flag, environment variable or preset value that cannot work."""

    exit_code = EXIT_CONFIG


class InputError(PipelineError):
    """Input data or an input artifact that is malformed, missing or corrupt."""

    exit_code = EXIT_INPUT


class StorageError(PipelineError):
    """The artifact store could not be reached or refused an operation (retryable)."""

    exit_code = EXIT_RETRYABLE
