"""The one error the CLIs' shared helpers raise (qlora_kit._cli): an option value that cannot be used."""
from qlora_kit.formats.errors import QloraKitError


class InvalidOption(QloraKitError):
    """An option value that cannot be used (device, shard size, skip list, an OUT that overlaps SRC)."""
