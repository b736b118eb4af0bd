"""click options generated from a config dataclass, so that a default is written once: in the dataclass.

Every option defaults to None, meaning "not given": the command passes on only the flags that were given,
and the dataclass fills in the rest.
"""
import dataclasses
import typing

import click


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
