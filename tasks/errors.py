"""The pipeline's errors: one family, each message naming the thing and the value, shown once by the CLI."""


class PipelineError(Exception):
    """A build step that cannot go on; the message is the one line a failed run reports."""


class SourceError(PipelineError):
    """A base model, adapter or tokenizer that cannot be used: missing, unsafe, or of the wrong kind."""


class TransientSourceError(SourceError):
    """The hub could not be reached or answered with a server error: worth retrying."""


class AdapterMismatch(PipelineError):
    """An adapter that does not fit its base: other architecture, missing modules, other shapes."""


class ValidationFailed(PipelineError):
    """The exported model disagrees with its reference, or the adapters change nothing."""
