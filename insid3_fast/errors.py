"""Exceptions raised by insid3_fast. Each message says what went wrong and what to do."""


class Insid3Error(Exception):
    """Base class of every error insid3_fast raises on purpose."""


class InputError(Insid3Error, ValueError):
    """An image, mask, keypoint file or argument that cannot be used."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """An image or mask path that names no file (a ``FileNotFoundError`` too, as the published
    loader raises)."""


class WeightsError(Insid3Error):
    """A DINOv3 checkpoint that is missing, unreadable or of an unknown layout."""


class BackendError(Insid3Error):
    """A requested backend (native ops, CUDA, CRF dependency) that is not available."""


class StateError(Insid3Error, RuntimeError):
    """No longer raised: the stateful API used by two threads raised it until 2026-12-04, where the
    published class raises nothing (it now warns); kept so that code which catches it still runs."""


class InputWarning(UserWarning):
    """An input that is used, but probably not as its caller meant (the message says how it was read)."""
