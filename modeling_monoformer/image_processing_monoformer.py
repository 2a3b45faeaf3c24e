"""MonoFormer image processor: PIL / numpy / torch images -> `[-1, 1]` float tensors (RGB or grayscale)."""

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

logger = logging.get_logger(__name__)


def with_channel_axis(images):
    """A 2-D `(H, W)` array or tensor is one grayscale image (what `np.array(pil_image)` gives for a mode "L" image):
    give it its channel axis, last for numpy arrays (`(H, W, 1)`, as PIL converts) and first for tensors (`(1, H, W)`,
    as torch lays images out). Lists (nested too) are handled element-wise; everything else is returned as is."""
    if isinstance(images, (list, tuple)):
        return type(images)(with_channel_axis(i) for i in images)
    if getattr(images, "ndim", None) != 2:
        return images
    return images[..., None] if isinstance(images, np.ndarray) else images[None]


class MonoFormerImagesKwargs(ImagesKwargs, total=False):
    num_channels: int


class MonoFormerImageProcessor(PilBackend):
    r"""
    Converts images to the `[-1, 1]` range the VAE (or a pixel-space MonoFormer) expects, with `num_channels` 3 (RGB)
    or 1 (grayscale). Inputs are read as `[0, 255]` (`do_rescale=True`); for float images already in `[0, 1]` pass
    `do_rescale=False`, for images already in `[-1, 1]` also `do_normalize=False` (a warning says so, as in
    transformers' image processors). Needs no torchvision. By default images keep their size; set `do_resize=True` and
    `size={"height": H, "width": W}` to resize (the processor checks that sizes fit the model's patch grid).

    Example:

    ```python
    >>> from PIL import Image
    >>> proc = MonoFormerImageProcessor(num_channels=1)
    >>> proc(Image.new("RGB", (28, 28), "white"), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 1, 28, 28])
    ```
    """

    valid_kwargs = MonoFormerImagesKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    size = {"height": 256, "width": 256}
    do_resize = False
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    num_channels = 3

    def __init__(self, num_channels: int = 3, **kwargs):
        if num_channels not in (1, 3):
            raise ValueError(f"`num_channels` must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
        kwargs.setdefault("image_mean", [0.5] * num_channels)
        kwargs.setdefault("image_std", [0.5] * num_channels)
        super().__init__(num_channels=num_channels, **kwargs)

    def preprocess(self, images, *args, **kwargs):
        """As transformers' `preprocess`; a 2-D `(H, W)` array or tensor is one grayscale image (`with_channel_axis`)."""
        return super().preprocess(with_channel_axis(images), *args, **kwargs)

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        image = super().process_image(image, do_convert_rgb=True, input_data_format=input_data_format, **kwargs)
        if image.shape[0] == 4:  # RGBA arrays: drop alpha
            image = image[:3]
        if self.num_channels == 1 and image.shape[0] == 3:
            # ITU-R 601-2 luma, the transform PIL's convert("L") applies
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, 1, 1)
            gray = (image.astype(np.float32) * weights).sum(0, keepdims=True)
            image = gray.round().astype(image.dtype) if np.issubdtype(image.dtype, np.integer) else gray
        elif self.num_channels == 3 and image.shape[0] == 1:
            image = np.repeat(image, 3, axis=0)
        return image

    def _preprocess(self, images, do_rescale, **kwargs):
        if do_rescale and any(
            np.issubdtype(image.dtype, np.floating) and image.size and image.min() >= -1 and image.max() <= 1
            for image in images
        ):
            logger.warning_once(
                "It looks like you are trying to rescale already rescaled images (float values within [-1, 1]); "
                "they would come out almost uniformly -1 (black). For images in [0, 1] pass `do_rescale=False`; for "
                "images already in [-1, 1] pass `do_rescale=False, do_normalize=False`."
            )
        return super()._preprocess(images, do_rescale=do_rescale, **kwargs)


MonoFormerImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["MonoFormerImageProcessor", "with_channel_axis"]
