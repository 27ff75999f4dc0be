"""The arg-max of a language model head's logits without writing them (``head_argmax``): greedy decoding's last op."""

from pallas_kernels.head_argmax.api import head_argmax

__all__ = ["head_argmax"]
