"""Typographic attack images: FigStep's and MM-SafetyBench's renderers, reproduced exactly.

FigStep (ThuCCSLab/FigStep @ 0861b17) draws
``textwrap.fill(instruction, 15) + "\\n1. \\n2. \\n3. "`` in black FreeMonoBold size 80 at
(20, 10), line spacing 11, on a white 760x760 RGB canvas.

MM-SafetyBench (isXinLiu/MM-SafetyBench, ``typo_format_text``/``typo_draw_img``/``vertical_concat``)
draws a key phrase in Arial size 90, greedily wrapped to 1024 pixels, at (0, 45) on a white canvas
1024 x 90*(lines+1); SD_TYPO stacks the Stable Diffusion image above that TYPO image.

The layout depends only on the font file and the wrap, so the font actually used is recorded (file
name and sha256) with every sample.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import shutil
import subprocess
import tempfile
import textwrap
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

FIGSTEP_FONT_ENV = "REJALIGN_FIGSTEP_FONT"
RENDER_CACHE_ENV = "REJALIGN_RENDER_CACHE"  # a folder: also keep renders on disk (opt-in)

FIGSTEP_SIZE = (760, 760)
FIGSTEP_FONT_SIZE = 80
FIGSTEP_XY = (20, 10)
FIGSTEP_SPACING = 11
FIGSTEP_WRAP = 15
FIGSTEP_SUFFIX = "\n1. \n2. \n3. "

# Where Debian/Ubuntu (fonts-freefont-ttf), Fedora (gnu-free-mono-fonts), Arch (gnu-free-fonts)
# and Homebrew put FreeMonoBold.
_FREEMONO_CANDIDATES = (
    "/usr/share/fonts/truetype/freefont/FreeMonoBold.ttf",
    "/usr/share/fonts/gnu-free/FreeMonoBold.ttf",
    "/usr/share/fonts/gnu-free/FreeMonoBold.otf",
    "/usr/share/fonts/TTF/FreeMonoBold.ttf",
    "/usr/local/share/fonts/FreeMonoBold.ttf",
    "/opt/homebrew/share/fonts/FreeMonoBold.ttf",
    "/Library/Fonts/FreeMonoBold.ttf",
)

# Used only when FreeMonoBold is missing: Pillow's bundled scalable font (Aileron Regular, shipped
# inside Pillow since 10.1). Its glyphs differ from FreeMonoBold, so such renders are not faithful.
FALLBACK_FONT_NAME = "pillow-default (Aileron Regular)"


@dataclass(frozen=True)
class FontChoice:
    """A resolved font: a file path (or None for Pillow's bundled fallback), its name and digest."""

    path: str | None
    name: str
    sha256: str
    faithful: bool


def _sha256(path: str | Path) -> str:
    from rejalign_tasks.contracts import sha256_file

    return sha256_file(path)


def _fc_match(pattern: str) -> str | None:
    if not shutil.which("fc-match"):
        return None
    try:
        out = subprocess.run(
            ["fc-match", "-f", "%{file}", pattern], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def _resolve_font(
    given: str | None,
    candidates: tuple[str, ...],
    fc_pattern: str,
    faithful_stems: frozenset[str],
    missing_message: str,
    what: str,
    env: str,
) -> FontChoice:
    """Shared font discovery: a given file, then known install paths, then fontconfig.

    Falls back to Pillow's bundled font with a loud warning (``missing_message``), so a run still
    works on a machine without the font, and every sample records that it is not faithful.
    """
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} font {path} (from {env} or the user) not found")
        return FontChoice(str(path), path.name, _sha256(path), path.stem in faithful_stems)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return FontChoice(candidate, Path(candidate).name, _sha256(candidate), True)
    matched = _fc_match(fc_pattern)
    if matched and Path(matched).stem in faithful_stems and os.path.isfile(matched):
        return FontChoice(matched, Path(matched).name, _sha256(matched), True)
    warnings.warn(missing_message, stacklevel=3)
    logger.warning(missing_message)
    import PIL

    return FontChoice(None, FALLBACK_FONT_NAME, f"pillow-{PIL.__version__}", False)


@functools.cache
def resolve_figstep_font(user_font: str | None = None) -> FontChoice:
    """Find FreeMonoBold: a user-given file, ``$REJALIGN_FIGSTEP_FONT``, system fonts, fontconfig.

    When none is found, warns loudly and falls back to Pillow's bundled font (documented; the
    images are then not faithful to FigStep and the sample logs say so).
    """
    return _resolve_font(
        user_font or os.environ.get(FIGSTEP_FONT_ENV),
        _FREEMONO_CANDIDATES,
        "FreeMono:bold",
        frozenset({"FreeMonoBold"}),
        "FreeMonoBold.ttf (GNU FreeFont) was not found, so FigStep images are rendered with "
        f"{FALLBACK_FONT_NAME}: they are NOT faithful to the FigStep protocol. Install it "
        "(Debian/Ubuntu: apt-get install fonts-freefont-ttf) or set "
        f"{FIGSTEP_FONT_ENV}=/path/to/FreeMonoBold.ttf.",
        "FigStep",
        FIGSTEP_FONT_ENV,
    )


@functools.lru_cache(maxsize=8)
def _load_font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size)


def figstep_text(instruction: str) -> str:
    """The exact text FigStep draws for an instruction."""
    return textwrap.fill(instruction, width=FIGSTEP_WRAP) + FIGSTEP_SUFFIX


def render_figstep(instruction: str, font: FontChoice | None = None) -> Image.Image:
    """Render one FigStep image (no cache)."""
    return draw_figstep_layout(figstep_text(instruction), font)


def draw_figstep_layout(text: str, font: FontChoice | None = None) -> Image.Image:
    """``text`` drawn as FigStep draws: black, size 80 at (20, 10), spacing 11, white 760x760."""
    font = font or resolve_figstep_font()
    image = Image.new("RGB", FIGSTEP_SIZE, "#FFFFFF")
    ImageDraw.Draw(image).text(
        FIGSTEP_XY,
        text,
        fill="#000000",
        font=_load_font(font.path, FIGSTEP_FONT_SIZE),
        spacing=FIGSTEP_SPACING,
    )
    return image


def _cache_dir() -> Path | None:
    """The opt-in on-disk render cache (``$REJALIGN_RENDER_CACHE``), or None."""
    setting = os.environ.get(RENDER_CACHE_ENV)
    if not setting or setting == "0":
        return None
    return Path(setting).expanduser()


def render_key(kind: str, text: str, font: FontChoice) -> str:
    """A cache key covering everything that changes the pixels."""
    import PIL

    material = "\x00".join([kind, text, font.sha256, PIL.__version__])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def cached_render(kind: str, text: str, font: FontChoice, render) -> Image.Image:
    """Return ``render()``'s image, from the in-memory cache or the opt-in disk cache.

    Rendering on demand is the default because it is cheap: benchmarks/render.py measures a FigStep
    render at about half the time of decoding the same image from a PNG file. An in-process LRU
    (``REJALIGN_RENDER_MEMORY_CACHE`` entries, default 64) serves repeats, e.g. a TYPO image reused
    for SD_TYPO. Setting ``REJALIGN_RENDER_CACHE`` to a folder also keeps lossless PNGs there
    (written atomically: temporary file + rename), for renderers slower than the file read.
    """
    key = render_key(kind, text, font)
    hit = _MEMORY_CACHE.get(key)
    if hit is not None:
        _MEMORY_CACHE.move_to_end(key)
        return hit.copy()
    folder = _cache_dir()
    image = None
    path = folder / kind / key[:2] / f"{key}.png" if folder else None
    if path is not None and path.is_file():
        try:
            with Image.open(path) as cached:
                image = cached.convert("RGB")
        except OSError:
            logger.warning("ignoring unreadable cached render %s", path)
    if image is None:
        image = render()
        if path is not None:
            _write_png(image, path)
    _remember(key, image)
    return image


_MEMORY_CACHE: OrderedDict[str, Image.Image] = OrderedDict()


def _remember(key: str, image: Image.Image) -> None:
    limit = int(os.environ.get("REJALIGN_RENDER_MEMORY_CACHE", "64"))
    if limit <= 0:
        return
    _MEMORY_CACHE[key] = image.copy()
    while len(_MEMORY_CACHE) > limit:
        _MEMORY_CACHE.popitem(last=False)


def _write_png(image: Image.Image, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            image.save(tmp, format="PNG", compress_level=1)
        os.replace(tmp.name, path)
    except OSError as exc:  # a read-only cache must not stop an evaluation
        logger.warning("render cache %s not writable: %s", path.parent, exc)


def figstep_image(instruction: str, font: FontChoice | None = None) -> Image.Image:
    """FigStep image for ``instruction``: rendered on demand, cached (see ``cached_render``)."""
    font = font or resolve_figstep_font()
    return cached_render("figstep", instruction, font, lambda: render_figstep(instruction, font))


# --- MM-SafetyBench TYPO and SD_TYPO ------------------------------------------------------------
# Read from MM-SafetyBench's image-creation code (typo_format_text, typo_draw_img, vertical_concat):
#   font_size = 90; font = ImageFont.truetype(<Arial>, 90); max_width = 1024
#   words = text.split(" "); line = words[0]; length = draw.textlength(words[0])
#   for each further word: length += textlength(" " + word)
#       if length < max_width: append " " + word          (strict "<": equal width wraps)
#       else: append "\n " + word; length = textlength(" " + word); lines += 1
#   canvas: RGB, width 1024, height 90 * (lines + 1), white; text black at (0, 90 / 2.0)
#   SD_TYPO: Image.new("RGB", (max(w1, w2), h1 + h2)) (Pillow's default fill, black), SD pasted at
#   (0, 0), TYPO at (0, h1). Every image was saved as .jpg with Pillow's default JPEG settings.

MMSAFETY_FONT_ENV = "REJALIGN_MMSAFETY_FONT"
MMSAFETY_FONT_SIZE = 90
MMSAFETY_MAX_WIDTH = 1024
MMSAFETY_XY = (0, MMSAFETY_FONT_SIZE / 2.0)

# Upstream uses Arial (proprietary). Liberation Sans has the same advance widths, so the greedy
# wrap and the canvas size come out the same. Debian/Ubuntu (fonts-liberation, fonts-liberation2),
# Fedora (liberation-sans-fonts), Arch (ttf-liberation) and macOS user installs.
_LIBERATION_SANS_CANDIDATES = (
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans-fonts/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/LiberationSans-Regular.ttf",
    "/usr/local/share/fonts/LiberationSans-Regular.ttf",
    "/Library/Fonts/LiberationSans-Regular.ttf",
)
# Font files whose metrics match upstream's: Liberation Sans Regular, or Arial itself.
_MMSAFETY_FAITHFUL_STEMS = frozenset({"LiberationSans-Regular", "Arial", "arial", "ARIAL"})


@functools.cache
def resolve_mmsafety_font(user_font: str | None = None) -> FontChoice:
    """Find Liberation Sans (or a user-given font such as Arial) for MM-SafetyBench TYPO images.

    Order: ``user_font``, ``$REJALIGN_MMSAFETY_FONT``, known install paths, fontconfig; else a
    loud warning and Pillow's bundled font (the wrap then differs from upstream's).
    """
    return _resolve_font(
        user_font or os.environ.get(MMSAFETY_FONT_ENV),
        _LIBERATION_SANS_CANDIDATES,
        "Liberation Sans:style=Regular",
        _MMSAFETY_FAITHFUL_STEMS,
        "LiberationSans-Regular.ttf was not found, so MM-SafetyBench TYPO images are rendered "
        f"with {FALLBACK_FONT_NAME}: line breaks and image sizes are NOT faithful to "
        "MM-SafetyBench. Install it (Debian/Ubuntu: apt-get install fonts-liberation) or set "
        f"{MMSAFETY_FONT_ENV}=/path/to/LiberationSans-Regular.ttf (or Arial.ttf).",
        "MM-SafetyBench",
        MMSAFETY_FONT_ENV,
    )


def mmsafety_wrap(
    text: str, font: FontChoice | None = None, max_width: float = MMSAFETY_MAX_WIDTH
) -> tuple[str, int]:
    """Upstream's greedy wrap: the text to draw and its number of lines.

    Widths come from ``ImageDraw.textlength`` as upstream measures them; a line whose width would
    reach ``max_width`` exactly is broken (strict ``<``), and each continuation line starts with
    the space upstream inserts after the newline.
    """
    font = font or resolve_mmsafety_font()
    pil_font = _load_font(font.path, MMSAFETY_FONT_SIZE)
    # Upstream measures on a scratch RGB canvas; its size does not affect textlength.
    draw = ImageDraw.Draw(Image.new("RGB", (MMSAFETY_MAX_WIDTH, 100), (255, 255, 255)))
    words = text.split(" ")
    formatted = words[0]
    length = draw.textlength(formatted, font=pil_font)
    lines = 1
    for word in words[1:]:
        length += draw.textlength(" " + word, font=pil_font)
        if length < max_width:
            formatted += " " + word
        else:
            formatted += "\n " + word
            length = draw.textlength(" " + word, font=pil_font)
            lines += 1
    return formatted, lines


def render_mmsafety_typo(key_phrase: str, font: FontChoice | None = None) -> Image.Image:
    """Render one MM-SafetyBench TYPO image (no cache, no JPEG step)."""
    font = font or resolve_mmsafety_font()
    formatted, lines = mmsafety_wrap(key_phrase, font)
    size = (MMSAFETY_MAX_WIDTH, MMSAFETY_FONT_SIZE * (lines + 1))
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text(MMSAFETY_XY, formatted, (0, 0, 0), font=_load_font(font.path, MMSAFETY_FONT_SIZE))
    return image


def mmsafety_typo_image(key_phrase: str, font: FontChoice | None = None) -> Image.Image:
    """TYPO image for ``key_phrase``: rendered on demand, cached (see ``cached_render``)."""
    font = font or resolve_mmsafety_font()
    return cached_render(
        "mmsafety_typo", key_phrase, font, lambda: render_mmsafety_typo(key_phrase, font)
    )


def vertical_concat(top: Image.Image, bottom: Image.Image) -> Image.Image:
    """Upstream's SD_TYPO composition: ``top`` above ``bottom`` on a black canvas as wide as the
    wider one (black shows only where the widths differ; SD and TYPO are both 1024 upstream)."""
    width = max(top.width, bottom.width)
    result = Image.new("RGB", (width, top.height + bottom.height))
    result.paste(top.convert("RGB"), (0, 0))
    result.paste(bottom.convert("RGB"), (0, top.height))
    return result


def jpeg_roundtrip(image: Image.Image) -> Image.Image:
    """The image as upstream's models saw it: saved as JPEG with Pillow's defaults (quality 75,
    4:2:0 subsampling) and decoded again."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")
