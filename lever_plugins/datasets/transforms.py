"""Image preprocessing for composed image retrieval: target-ratio padding + CLIP-style resize/crop.

CIRR photos come in every aspect ratio. A plain resize-then-center-crop cuts off the sides of a wide
image, and with them objects the modification text may talk about. CLIP4Cir introduced, and SPRC
kept, a middle way: pad an image only when its aspect ratio is more extreme than ``target_ratio``
(1.25), and then only up to that ratio, so the crop that follows loses little content while
near-square images are not shrunk by padding.
"""
from __future__ import annotations

from typing import Any, Sequence

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TargetPad:
    """Pad the short side so that ``long / short`` is at most ``target_ratio``.

    An image whose aspect ratio (long side over short side) is at most ``target_ratio`` is returned
    unchanged. Otherwise the short side is padded, evenly on both sides with ``fill``, to
    ``round(long / target_ratio)`` pixels. Works on PIL images and on ``(C, H, W)`` tensors.

    Args:
        target_ratio: the largest aspect ratio left as is; > 1 (1.0 would always pad to square).
        fill: padding value (0: black, as in CLIP4Cir/SPRC).
    """

    def __init__(self, target_ratio: float = 1.25, fill: int = 0) -> None:
        if not target_ratio >= 1.0:
            raise ValueError(f"target_ratio must be >= 1, got {target_ratio}")
        self.target_ratio = float(target_ratio)
        self.fill = fill

    def padding(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` padding for an image of the given size."""
        long_side, short_side = max(width, height), min(width, height)
        if short_side <= 0:
            raise ValueError(f"image has an empty side: {width}x{height}")
        if long_side / short_side <= self.target_ratio:
            return (0, 0, 0, 0)
        total = max(round(long_side / self.target_ratio) - short_side, 0)
        before, after = total // 2, total - total // 2
        if width >= height:
            return (0, before, 0, after)
        return (before, 0, after, 0)

    def __call__(self, image: Any) -> Any:
        width, height = F.get_image_size(image)
        padding = self.padding(width, height)
        if padding == (0, 0, 0, 0):
            return image
        return F.pad(image, list(padding), fill=self.fill, padding_mode="constant")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_ratio={self.target_ratio}, fill={self.fill})"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode (L, P, RGBA, ...) to RGB; module-level so it pickles."""
    return image if image.mode == "RGB" else image.convert("RGB")


def cir_image_transform(
    image_size: int = 224,
    target_ratio: float = 1.25,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    train: bool = False,
) -> T.Compose:
    """PIL image -> normalised ``(3, image_size, image_size)`` float tensor.

    RGB → :class:`TargetPad` → bicubic resize of the short side to ``image_size`` → center crop →
    tensor → normalise.

    Args:
        image_size: output height and width in pixels.
        target_ratio: see :class:`TargetPad`.
        mean, std: per-channel normalisation (CLIP's by default, as the BLIP-2 ViT expects).
        train: accepted so recipes can name the training pipeline; it is the same as evaluation's.
            SPRC trains without augmentation, and the usual flip or crop would contradict captions
            such as "move it to the left".

    Returns:
        A picklable torchvision ``Compose`` (safe for DataLoader workers).
    """
    del train  # deliberately identical pipelines, see the docstring
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return T.Compose(
        [
            to_rgb,
            TargetPad(target_ratio),
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(tuple(mean), tuple(std)),
        ]
    )
