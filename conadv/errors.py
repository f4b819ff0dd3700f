"""Errors a user can cause and fix; the CLI prints them as one sentence, without a traceback."""


class UserError(Exception):
    """Base class for mistakes in the configuration, the data or the environment."""


class ConfigError(UserError):
    """The configuration is invalid (unknown key, wrong type, value out of range, batch split)."""


class DataError(UserError):
    """The dataset is missing, empty or contains an unreadable file under the `fail` policy."""


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (no space, quota, permission, I/O error)."""


class TrainingDiverged(UserError):
    """The loss or gradient norm became non-finite."""


class ExportError(UserError):
    """An exported model does not compute what the PyTorch model computes."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """An underlying error quoted inside one of ours: its first line, cut at `limit`
    characters (torch's and gloo's messages run to many lines), or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def collapsed(err: BaseException, limit: int = 240) -> str:
    """An underlying error on one line, all of it up to `limit` characters: for messages whose
    first line says nothing (torch's "Error(s) in loading state_dict for X:" lists the keys on
    the lines after it)."""
    text = " ".join(str(err).split())
    return (text[:limit] + "...") if len(text) > limit else text or type(err).__name__
