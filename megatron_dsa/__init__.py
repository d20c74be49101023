"""megatron-dsa: DeepSeek Sparse Attention for Megatron-Core training.

Importing the package is cheap and does not import Megatron-Core; the pieces that need it
(`megatron_dsa.spec`, `megatron_dsa.attention`, `megatron_dsa.patches`, `megatron_dsa.enable`)
import it on use.

    import megatron_dsa
    megatron_dsa.enable()   # Megatron's own DSA builders (GPT and hybrid) build these layers
"""

__version__ = "0.1.0"


def enable(log: bool = True):
    """Make Megatron-Core's DSA builders build megatron-dsa's layers (see
    :mod:`megatron_dsa.integration`). Idempotent; returns the symbols changed."""
    from .integration import enable as _enable

    return _enable(log=log)


def disable() -> None:
    """Undo :func:`enable`."""
    from .integration import disable as _disable

    _disable()
