"""MonoFormer: one transformer that writes text autoregressively and paints images by diffusion."""

from .configuration_monoformer import MonoFormerConfig
from .data_collator_monoformer import MonoFormerDataCollator, add_training_noise
from .image_experts_monoformer import enable_image_experts, freeze_text_weights, merge_image_lora
from .image_processing_monoformer import MonoFormerImageProcessor
from .lora_monoformer import add_lora, build_lora_config
from .modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerModel,
    MonoFormerPreTrainedModel,
)
from .pipeline_monoformer import MonoFormerInterleavedOutput, MonoFormerPipeline
from .precision_monoformer import bf16_supported, preferred_dtype, resolve_dtype
from .processing_monoformer import MonoFormerProcessor
from .scheduler_rules_monoformer import default_noise_scheduler
from .tokenizer_training_monoformer import train_bpe_tokenizer

__version__ = "0.1.0"

__all__ = [
    "MonoFormerConfig",
    "MonoFormerModel",
    "MonoFormerPreTrainedModel",
    "MonoFormerForConditionalGeneration",
    "MonoFormerImageProcessor",
    "MonoFormerProcessor",
    "MonoFormerPipeline",
    "MonoFormerInterleavedOutput",
    "MonoFormerDataCollator",
    "add_training_noise",
    "default_noise_scheduler",
    "bf16_supported",
    "preferred_dtype",
    "resolve_dtype",
    "enable_image_experts",
    "freeze_text_weights",
    "merge_image_lora",
    "add_lora",
    "build_lora_config",
    "train_bpe_tokenizer",
]
