"""Which module paths an adapter config selects, with PEFT's semantics (peft.tuners.tuners_utils
check_target_module_exists, PEFT 0.17-0.21), for LoRA-capable module paths such as
`model.layers.3.self_attn.q_proj`:

1. exclude_modules: a string is a regular expression that must match the whole path (re.fullmatch); a list
   excludes a path equal to an entry or ending with "." + entry. Excluded paths are never selected.
2. target_modules: a string is a regular expression matched against the whole path ("all-linear" is PEFT's
   shorthand for every linear layer but the output layer); a list selects a path equal to an entry or ending with
   "." + entry.
3. layers_to_transform (list targets only, and not for a path equal to an entry): the path's layer index must be one of them. The index is the first
   all-digit path part that follows `<layers_pattern>.` (the pattern matching whole dotted parts, starting at the
   beginning or after a dot), or, without layers_pattern, the first all-digit part preceded by at least two parts;
   both are followed by a further part. A path with no index is not selected.

Patterns run on formats/_pattern.py's backtracking-free engine (they come from untrusted adapter_config.json files).
"""
from ._pattern import FullMatch, PatternError

ALL_LINEAR = "all-linear"


class Targets:
    """Compiled selection rules of one config.

    Args:
        target_modules: a regex string, or a tuple of names (("all-linear",) = every LoRA-capable path).
        exclude_modules: a regex string or a tuple of names (() = none).
        layers_to_transform: layer indices (() = every layer).
        layers_pattern: names of the layer list in paths (() = the default rule above).

    Raises:
        PatternError naming the field whose pattern is outside the supported syntax.
    """

    def __init__(self, target_modules, exclude_modules=(), layers_to_transform=(), layers_pattern=()):
        self.target = _compile(target_modules, "target_modules") if isinstance(target_modules, str) else None
        self.names = () if isinstance(target_modules, str) else tuple(target_modules)
        self.exclude = _compile(exclude_modules, "exclude_modules") if isinstance(exclude_modules, str) else None
        self.exclude_names = () if isinstance(exclude_modules, str) else tuple(exclude_modules)
        self.layers = frozenset(layers_to_transform)
        self.layer_patterns = [_compile(p, "layers_pattern") for p in layers_pattern]

    def excluded(self, path: str) -> bool:
        if self.exclude is not None:
            return self.exclude(path)
        return _suffix_match(path, self.exclude_names)

    def selects(self, path: str) -> bool:
        """Whether the adapter goes on `path` (a LoRA-capable module path)."""
        if self.excluded(path):
            return False
        if self.target is not None:
            return self.target(path)
        if path in self.names:  # PEFT: a path named exactly is selected before any layer filter
            return True
        found = self.names == (ALL_LINEAR,) or _suffix_match(path, self.names)
        if found and self.layers:
            index = self.layer_index(path)
            return index is not None and index in self.layers
        return found

    def layer_index(self, path: str) -> int | None:
        parts = path.split(".")
        candidates = [j for j in range(1, len(parts) - 1) if parts[j].isdecimal() and parts[j].isascii()]
        if not self.layer_patterns:
            return next((int(parts[j]) for j in candidates if j >= 2), None)
        for pattern in self.layer_patterns:
            for start in range(len(parts)):
                for j in candidates:
                    if j > start and pattern(".".join(parts[start:j])):
                        return int(parts[j])
        return None


def _suffix_match(path: str, names: tuple[str, ...]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _compile(pattern: str, field: str) -> FullMatch:
    try:
        return FullMatch(pattern)
    except PatternError as e:
        raise PatternError(f"{field} {pattern!r}: {e}") from None
