"""At which resolution a slide is segmented: the level read, the resampling to the model's pixel size, and the
frame that maps the output back onto the slide.

The output of a slide is an image at the model's pixel size (``Resolution.pixel_size_um``). Its pixel ``i``
covers level-0 pixels ``[i * to_level0, (i + 1) * to_level0)`` (``unet.resample``: the grids share their
top-left corner), so a point at output pixel coordinate ``c`` (pixel centres at integers) lies at level-0
coordinate ``(c + 0.5) * to_level0 - 0.5``, and a pixel edge ``e`` at ``e * to_level0``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from unet.errors import UserError
from unet.resample import TOLERANCE, Resampled, choose_level, same_size
from unet.slides import MAX_PIXELS, Slide, SlideError, open_slide

if TYPE_CHECKING:
    from unet.slides.tiles import TileCache

log = logging.getLogger(__name__)
FAR_UPSAMPLING = 1.5  # up-sampling a slide more than this is warned of: it holds less detail than the model saw
MAX_FACTOR = 8  # resampling by more than this, either way, is refused (see check_scale)


@dataclass(frozen=True)
class Resolution:
    """How one slide is read: level ``level`` (whose pixels are ``level_pixel_size_um``) at ``scale`` of its
    pixels per output pixel (1: as stored). Sizes are micrometres per pixel, None where unknown."""

    level: int
    scale: float
    to_level0: float  # level-0 pixels per output pixel
    slide_pixel_size_um: float | None  # level 0's: from the slide's metadata or infer.pixel_size_um
    level_pixel_size_um: float | None
    model_pixel_size_um: float | None
    reason: str  # why the slide is read this way, one phrase
    pixel_size_stated: bool = True  # by the slide's metadata (False: by infer.pixel_size_um, or unknown)

    @property
    def resampled(self) -> bool:
        return self.scale != 1.0

    @property
    def pixel_size_um(self) -> float | None:
        """The output's pixel size."""
        return None if self.level_pixel_size_um is None else self.level_pixel_size_um * self.scale

    def describe(self) -> str:
        """One line, e.g. "level 0 (0.499 um/px) resampled to 0.25 um/px (the model's)"."""
        size = f" ({self.level_pixel_size_um:.4g} um/px)" if self.level_pixel_size_um else " (pixel size unknown)"
        if self.resampled:
            return f"level {self.level}{size} resampled to {self.pixel_size_um:.4g} um/px: {self.reason}"
        return f"level {self.level}{size} as stored: {self.reason}"

    def as_dict(self) -> dict:
        return {**asdict(self), "pixel_size_um": self.pixel_size_um, "resampled": self.resampled}

    @classmethod
    def from_dict(cls, recorded: dict) -> Resolution:
        """The ``Resolution`` an output's lineage records (``as_dict``)."""
        return cls(**{field.name: recorded[field.name] for field in fields(cls) if field.name in recorded})


def plan_resolution(
    path: str,
    model_pixel_size_um: float | None,
    level: int | None = None,
    pixel_size_um: float | None = None,
    resample: bool = True,
) -> Resolution:
    """How to read slide ``path`` for a model trained at ``model_pixel_size_um``: ``level`` (None: the coarsest
    not coarser than the model's pixels, ``unet.resample.choose_level``), resampled to the model's pixel size
    unless within ``unet.resample.TOLERANCE``. ``pixel_size_um`` gives level 0's pixel size where the slide's
    metadata has none (or overrides it); ``resample=False`` reads ``level`` (default 0) as stored."""
    with open_slide(path, 0) as first:
        widths, heights, stated = [first.width], [first.height], first.pixel_size_um
        for index in range(1, first.levels):
            with open_slide(path, index) as lower:
                widths.append(lower.width)
                heights.append(lower.height)
    if pixel_size_um is not None and stated is not None and not same_size(stated, pixel_size_um):
        log.warning("%s: its metadata says %.4g um/px; infer.pixel_size_um=%g is used", path, stated, pixel_size_um)
    slide_size = pixel_size_um or stated
    sizes = [None if slide_size is None else slide_size * widths[0] / width for width in widths]
    if level is not None and not 0 <= level < len(widths):
        raise SlideError(f"{path}: level {level} does not exist; it has {len(widths)} levels (0 to {len(widths) - 1})")
    if not resample or model_pixel_size_um is None:
        chosen = level or 0
        reason = "infer.resample is false" if not resample else "the model records no pixel size"
        return Resolution(chosen, 1.0, widths[0] / widths[chosen], slide_size, sizes[chosen], model_pixel_size_um,
                          reason, stated is not None)  # fmt: skip
    if slide_size is None:
        raise UserError(
            f"{path} has no pixel size in its metadata; set infer.pixel_size_um to its level 0's micrometres per "
            f"pixel (the model was trained at {model_pixel_size_um:.4g}), or infer.resample=false to segment it as "
            "stored"
        )
    chosen = choose_level(sizes, model_pixel_size_um) if level is None else level
    if same_size(sizes[chosen], model_pixel_size_um):
        scale, reason = 1.0, f"within {TOLERANCE:.0%} of the model's {model_pixel_size_um:.4g} um/px"
    else:
        scale, reason = model_pixel_size_um / sizes[chosen], "the model's pixel size"
    check_scale(path, scale, sizes[chosen], model_pixel_size_um, widths[chosen] * heights[chosen])
    return Resolution(chosen, scale, scale * widths[0] / widths[chosen], slide_size, sizes[chosen],
                      model_pixel_size_um, reason, stated is not None)  # fmt: skip


def check_scale(path: str, scale: float, size: float, model_size: float, pixels: int) -> None:
    """Warn of a slide up-sampled by more than ``FAR_UPSAMPLING``; refuse one resampled by more than
    ``MAX_FACTOR`` either way, or whose resampled level would exceed ``unet.slides.MAX_PIXELS``: its stated pixel
    size is wrong (a TIFF's 72 dpi reads as 352.8 um/px), it lacks the pyramid levels between (each chunk would
    read a window ``scale`` times its side), or it is no slide for this model."""
    if scale > MAX_FACTOR:
        raise SlideError(
            f"{path}: its finest level fit for the model ({size:.4g} um/px) is {scale:.1f}x finer than the model's "
            f"{model_size:.4g} um/px, more than the {MAX_FACTOR}x it is down-sampled at most; add pyramid levels "
            "(python -m pipelines.convert writes them) or set infer.pixel_size_um if its metadata is wrong"
        )
    if scale < 1 / MAX_FACTOR or pixels / scale**2 > MAX_PIXELS:
        raise SlideError(
            f"{path}: its pixels ({size:.4g} um) are {1 / scale:.1f}x the model's ({model_size:.4g} um), more than "
            f"the {MAX_FACTOR}x it is up-sampled at most; if its metadata is wrong, set infer.pixel_size_um to its "
            "level 0's micrometres per pixel"
        )
    if scale < 1 / FAR_UPSAMPLING:
        log.warning("%s: its pixels (%.4g um) are %.1fx the model's (%.4g um): up-sampled, small objects may be "
                    "missed", path, size, 1 / scale, model_size)  # fmt: skip


def open_at(path: str, level: int, scale: float, tiles: TileCache | None = None) -> Slide | Resampled:
    """Level ``level`` of a slide at ``scale`` of its pixels per pixel (``Resolution``): the level itself where
    ``scale`` is 1, else a resampled view of it; ``tiles`` keeps its decoded stored chunks (``Slide.with_tiles``)."""
    slide = open_slide(path, level)
    slide = slide.with_tiles(tiles) if tiles is not None else slide
    return Resampled(slide, scale) if scale != 1.0 else slide
