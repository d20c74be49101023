"""megatron-dsa: DeepSeek Sparse Attention for Megatron-Core training.

Importing the package is cheap and does not import Megatron-Core; the pieces that need it
(`megatron_dsa.spec`, `megatron_dsa.attention`, `megatron_dsa.patches`) import it on use.
"""

__version__ = "0.1.0"
