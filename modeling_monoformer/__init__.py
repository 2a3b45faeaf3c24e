"""MonoFormer: one transformer that writes text autoregressively and paints images by diffusion."""

from .configuration_monoformer import MonoFormerConfig
from .modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerModel,
    MonoFormerPreTrainedModel,
)

__version__ = "0.1.0"

__all__ = [
    "MonoFormerConfig",
    "MonoFormerModel",
    "MonoFormerPreTrainedModel",
    "MonoFormerForConditionalGeneration",
]
