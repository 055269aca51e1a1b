"""A Qwen2-VL processor that works without torchvision (images only, no video processor).

transformers' `Qwen2VLProcessor` always builds a video processor, and the only Qwen2-VL video
processor needs torchvision, which cannot be installed beside this torch. The edit pipelines
only feed images, so this subclass passes no video processor.

`ProcessorMixin` is imported here on purpose: diffusers' `from_pretrained` resolves a custom
component's loader by looking the loadable base classes up in the module that defines it.
"""

from __future__ import annotations

from transformers import ProcessorMixin, Qwen2VLProcessor  # noqa: F401  (ProcessorMixin: see above)

__all__ = ["Qwen2VLImageOnlyProcessor", "ProcessorMixin"]


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` with an image processor and a tokenizer, but no video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )
