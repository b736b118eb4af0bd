"""click options generated from a config dataclass, so that a default is written once: in the dataclass.

Every option defaults to None, meaning "not given": the command passes on only the flags that were given,
and the dataclass fills in the rest.
"""
import dataclasses
import re
import typing
from pathlib import Path

import click

from .errors import InvalidOption

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def dataclass_options(cls, *, skip=(), plain_flags=(), default_text: str = "  [default: {!r}]",
                      require_help: bool = False) -> list[click.Option]:
    """One click.Option per field of the dataclass `cls`, in field order.

    A field `max_seq_len` becomes `--max-seq-len`; its help is `field.metadata["help"]` followed by
    `default_text` formatted with the field's default (left out when the default is "" or missing). The type comes
    from the default: bool -> a `--x/--no-x` pair (or a plain `--x` for names in `plain_flags`), a tuple -> one
    comma-separated string given back as a tuple of its non-empty parts, int/float/str -> that type, None -> the
    annotation's `X` of `X | None`; `metadata["choices"]` makes a click.Choice.

    Args:
        cls: a dataclass type.
        skip: field names that get no option (the command declares them itself).
        plain_flags: bool fields that are a plain on-switch.
        default_text: format of the help's default suffix.
        require_help: a field without metadata["help"] is a TypeError (a programming error: the flag would show
            only its default).
    """
    options = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name, default = "--" + f.name.replace("_", "-"), f.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_ = f.metadata.get("help", "")
        if require_help and not help_:
            raise TypeError(f"{cls.__name__}.{f.name}: no metadata['help']; every {name} needs a description")
        if shown not in ("", dataclasses.MISSING):
            help_ = (help_ + default_text.format(shown)).strip()
        if isinstance(default, bool):
            kind = {"is_flag": True} if f.name in plain_flags else {}
            decls = [name] if kind else [f"{name}/--no-{name[2:]}"]
        elif f.metadata.get("choices"):
            decls, kind = [name], {"type": click.Choice(f.metadata["choices"])}
        elif isinstance(default, tuple):
            decls, kind = [name], {"type": str, "callback": _split_commas}
        else:
            decls, kind = [name], {"type": _type(f)}
        options.append(click.Option([*decls, f.name], default=None, help=help_, **kind))
    return options


def _type(f: dataclasses.Field) -> type:
    """The click type of a non-bool, non-tuple field: its default's type, else the `X` of an `X | None` annotation."""
    if f.default is not None and f.default is not dataclasses.MISSING:
        return type(f.default)
    return next((t for t in typing.get_args(f.type) if t in (int, float, str)), str)


def _split_commas(ctx, param, value):
    return None if value is None else tuple(s.strip() for s in value.split(",") if s.strip())


def parse_size(text: str | int, option: str = "--max-shard-size") -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, 1000 -> 1000 (decimal units as transformers)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise InvalidOption(f"{option} {text!r}: expected a size such as 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise InvalidOption(f"{option} {text!r}: must be positive")
    return value


def check_out(out: Path, src: Path) -> None:
    """OUT may not be SRC, lie inside it, or contain it (--overwrite replaces OUT: it would delete SRC)."""
    o, f = out.resolve(), src.resolve()
    if o == f or f in o.parents or o in f.parents:
        raise InvalidOption(f"{out}: OUT must not be SRC ({src}), lie inside it or contain it")
