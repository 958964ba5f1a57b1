"""Settings declared once: a dataclass field that is also its command-line flag (setting),
the parser built from such fields, and the argparse types they share."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable


def at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low`, refused in words that name `what`."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, not '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be {low} or more, not {value}")
        return value
    return convert


def path_value(text: str) -> str:
    """An argparse type for a path: refused where empty (a script's unset variable), which
    would otherwise read as "not given" or as the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (is a variable in the command unset?)")
    return text


def setting(default: object, help: str | Callable[[], str], *flags: str, meta: dict | None = None,
            **argparse_kwargs: object) -> dataclasses.Field:
    """A dataclass field that is also a command-line flag, declared once: its default (a
    list, or a function giving it, is a default_factory), the flags that set it (--NAME with
    dashes unless given), its --help ('{default}' in it shows the default; a function gives
    the text when the parser is built, as does a function given as `choices`), what argparse
    needs to read it (type, nargs, metavar, action, choices) and, in `meta`, what the
    program's own checks of combinations read."""
    metadata = {"help": help, "flags": flags, "argparse": argparse_kwargs, **(meta or {})}
    if callable(default) or isinstance(default, list):
        factory = default if callable(default) else (lambda: list(default))
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flags_of(settings: type) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that are flags."""
    return [f for f in dataclasses.fields(settings) if "help" in f.metadata]


def flag_name(f: dataclasses.Field) -> str:
    """The flag that sets a field, as messages name it: its first."""
    return f.metadata["flags"][0] if f.metadata["flags"] else "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_settings(group: argparse._ArgumentGroup, settings: type, defaults: dict | None = None) -> None:
    """One flag per field of `settings` that is one (setting), with no default of its own:
    the dataclass's is taken where the flag is missing (given), so that a parser whose
    missing flags are left out tells which flags a command gave. `defaults` overrides the
    default the help shows."""
    for f in flags_of(settings):
        shown = (defaults or {}).get(f.name, default_of(f))
        text = f.metadata["help"]
        shown = " ".join(map(str, shown)) if isinstance(shown, (list, tuple)) else shown
        text = text() if callable(text) else text.format(**f.metadata, default=shown)  # e.g. {quick} too
        kwargs = {k: v() if k == "choices" and callable(v) else v for k, v in f.metadata["argparse"].items()}
        group.add_argument(*(f.metadata["flags"] or ["--" + f.name.replace("_", "-")]), dest=f.name, help=text,
                           **kwargs)


def given(settings: type, args: argparse.Namespace, **values: object) -> object:
    """`settings` from the flags given, the dataclass's defaults for the rest, and `values`
    (checked or converted by the caller) over both."""
    kwargs = {f.name: getattr(args, f.name) for f in flags_of(settings) if getattr(args, f.name, None) is not None}
    return settings(**(kwargs | values))
