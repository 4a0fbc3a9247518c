"""One exception root for the appliance.

Every error says whether retrying the same operation can help (`retryable`). Adapters translate
third-party exceptions (serial, evdev, HTTP, MQTT) into these at their boundary; the till and the
journal only ever see `ApplianceError` subclasses.
"""


class ApplianceError(Exception):
    """Root of every error the appliance raises on purpose."""

    retryable = False


class ConfigError(ApplianceError, ValueError):
    """The configuration is invalid. `key` is the dotted path of the offending key ("" = the file)."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}" if key else reason)


class BadInput(ApplianceError, ValueError):
    """A scan, an amount or a command argument is malformed. Nothing was changed."""


class BadMessage(ApplianceError, ValueError):
    """An MQTT payload that is not its kind's JSON Schema (or not JSON at all). `reason` names the
    JSON path and the problem in at most ~200 characters, digit runs that could be a payment code
    masked; it never quotes more of the payload."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class Refused(ApplianceError):
    """A well-formed request that policy refuses (order already paid, no platform for a type...)."""


class IllegalTransition(ApplianceError):
    """A journal state change that the state machine does not allow. A programming error."""


class ProviderError(ApplianceError):
    """A payment platform adapter failed in a way that is not an uncertain payment outcome."""


class ProviderUnavailable(ProviderError):
    """The platform could not be reached and no request left this device. Retryable."""

    retryable = True


class NoAnswer(ProviderError):
    """A request may have reached the platform, but no usable answer came back (read timeout, reset
    after sending, a body that is not the protocol's). The outcome is unknown: query, never resend."""

    retryable = True


class ProviderMisconfigured(ProviderError):
    """The platform refused our credentials or request shape (signature, app id). Permanent."""


class DeviceError(ApplianceError):
    """A scanner or indicator device is missing or failed. Retryable: devices come back."""

    retryable = True


class JournalError(ApplianceError):
    """The journal cannot be used: its directory is unusable or a write failed. Nothing was recorded."""


class JournalFull(JournalError):
    """A journal write failed because the disk is full. Retryable once there is room."""

    retryable = True


class JournalIntegrityError(JournalError):
    """The journal is not the one this lane had: missing, empty, replaced, or its key or id file does
    not belong to it. Taking payments would forget what was charged; exit code 6."""


class JournalLost(JournalIntegrityError):
    """The running service's journal file was unlinked or replaced under it."""


class UplinkError(ApplianceError):
    """Head office's broker cannot be reached, refused the connection, or refused an event. Nothing
    is lost: the events stay queued in the journal's outbox. Retryable."""

    retryable = True
