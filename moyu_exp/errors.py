"""Errors that end a run with a one-line message instead of a traceback."""

from __future__ import annotations

import difflib
import re


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one actionable line."""


class InputError(ValueError):
    """An input file (data, cache, checkpoint) that cannot be read; one line naming the file."""


class NonFiniteLogits(RuntimeError):
    """A forward pass produced NaN or inf logits."""


class ResultsNotWritten(OSError):
    """results.json (or another output) could not be written."""


class EnvironmentFault(RuntimeError):
    """The machine cannot do what the run needs (a folder it cannot write, no compiler, no
    network); the message says what to do."""


KNOWN = (ConfigError, InputError, NonFiniteLogits, ResultsNotWritten, EnvironmentFault)
# omegaconf's errors about the composed config itself (a value left ???, a wrong type)
CONFIG_VALUE_ERRORS = ("MissingMandatoryValue", "ValidationError", "InterpolationResolutionError")


def _config_value_error(err: BaseException) -> bool:
    kind = type(err)
    return kind.__name__ in CONFIG_VALUE_ERRORS and kind.__module__.startswith("omegaconf")


def _refused_path(err: BaseException) -> bool:
    """An OSError about a file or folder the machine would not let us use (not one of ours)."""
    return (
        isinstance(err, OSError)
        and bool(getattr(err, "filename", None))
        and not isinstance(err, KNOWN)
    )


def is_known(err: BaseException) -> bool:
    """Errors whose message is the whole story: bad input, numerical failure, out of memory, a
    file or folder the machine would not let us use."""
    return isinstance(err, KNOWN) or _refused_path(err) or type(err).__name__ == "OutOfMemoryError"


class Interrupts:
    seen = False  # Ctrl-C was pressed in this process (set by on_interrupt)


def on_interrupt(_signum, _frame) -> None:
    """Python's own Ctrl-C handler that remembers it ran (the CLI installs it): an interrupt
    inside torch's or transformers' imports can come out as one of their errors without the
    KeyboardInterrupt (seen: AttributeError "module 'torch' has no attribute 'ops'")."""
    Interrupts.seen = True
    raise KeyboardInterrupt


def check_interrupt() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that a library swallowed (torch's import can
    turn it into a missing optional part and go on): called between a run's phases."""
    if Interrupts.seen:
        raise KeyboardInterrupt


def interrupted(err: BaseException) -> bool:
    """Whether ``err`` came out of a Ctrl-C: one was pressed (under :func:`on_interrupt`) or a
    KeyboardInterrupt is among its causes and contexts."""
    if Interrupts.seen:
        return True
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def is_config_mistake(err: BaseException) -> bool:
    """Hydra composition errors, omegaconf's errors about config values, and our own config
    checks (exit code 2)."""
    from hydra.errors import CompactHydraException

    return isinstance(err, ConfigError | CompactHydraException) or _config_value_error(err)


def missing_value(key: str) -> str:
    """The one line for a mandatory key (``???``) left unset."""
    return f"{key} is missing (???): give it on the command line, e.g. {key}=..."


def one_line(err: BaseException) -> str:
    """What went wrong and what is accepted, in one line, for a config or input mistake."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = err.__cause__
    if _refused_path(err):
        return (
            f"cannot use '{err.filename}' ({err.strerror or err}): give a path this machine can "
            "read and write (hydra.run.dir=..., hydra.sweep.dir=..., MOYU_CACHE_DIR, data_dir)"
        )
    if type(err).__name__ == "MissingMandatoryValue":
        return missing_value(getattr(err, "full_key", None) or "a key")
    if _config_value_error(err):
        key = getattr(err, "full_key", None)
        return f"{key}: {_first(str(err))}" if key else _first(str(err))
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = err.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(name, list(err.options), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown {group} '{name}'{hint}: accepted are {', '.join(err.options)}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override '{err.override}': {_first(str(err))}"
    if cause is not None and type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):
        key = getattr(cause, "full_key", None) or _quoted(str(cause))
        return (
            f"unknown key '{key}': see `python -m moyu_exp --cfg job` for the accepted keys "
            f"(new keys need a leading +)"
        )
    if cause is not None and type(cause).__name__ == "ValidationError":
        key = getattr(cause, "full_key", None)
        prefix = f"{key}: " if key else ""
        return f"{prefix}{_first(str(cause))}"
    message = _first(str(err))
    if cause is not None and _first(str(cause)) not in message:
        message += f": {_first(str(cause))}"
    return message


def _first(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _quoted(text: str) -> str:
    match = re.search(r"'([^']+)'", text)
    return match.group(1) if match else text
