"""Typographic attack images: FigStep's renderer, reproduced exactly, with font discovery and a cache.

FigStep (ThuCCSLab/FigStep @ 0861b17) draws ``textwrap.fill(instruction, 15) + "\\n1. \\n2. \\n3. "``
in black FreeMonoBold size 80 at (20, 10), line spacing 11, on a white 760x760 RGB canvas. The
layout depends only on the font file and the wrap, so the font actually used is recorded (file
name and sha256) with every sample.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

FIGSTEP_FONT_ENV = "REJALIGN_FIGSTEP_FONT"
RENDER_CACHE_ENV = "REJALIGN_RENDER_CACHE"  # a folder, or "0" to disable the disk cache

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
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


@functools.lru_cache(maxsize=None)
def resolve_figstep_font(user_font: str | None = None) -> FontChoice:
    """Find FreeMonoBold: a user-given file, ``$REJALIGN_FIGSTEP_FONT``, system fonts, fontconfig.

    When none is found, warns loudly and falls back to Pillow's bundled font (documented; the
    images are then not faithful to FigStep and the sample logs say so).
    """
    given = user_font or os.environ.get(FIGSTEP_FONT_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FigStep font {path} (from {FIGSTEP_FONT_ENV} or the user) not found")
        return FontChoice(str(path), path.name, _sha256(path), path.stem == "FreeMonoBold")
    for candidate in _FREEMONO_CANDIDATES:
        if os.path.isfile(candidate):
            return FontChoice(candidate, Path(candidate).name, _sha256(candidate), True)
    matched = _fc_match("FreeMono:bold")
    if matched and Path(matched).stem == "FreeMonoBold" and os.path.isfile(matched):
        return FontChoice(matched, Path(matched).name, _sha256(matched), True)
    message = (
        "FreeMonoBold.ttf (GNU FreeFont) was not found, so FigStep images are rendered with "
        f"{FALLBACK_FONT_NAME}: they are NOT faithful to the FigStep protocol. Install it "
        "(Debian/Ubuntu: apt-get install fonts-freefont-ttf) or set "
        f"{FIGSTEP_FONT_ENV}=/path/to/FreeMonoBold.ttf."
    )
    warnings.warn(message, stacklevel=2)
    logger.warning(message)
    import PIL

    return FontChoice(None, FALLBACK_FONT_NAME, f"pillow-{PIL.__version__}", False)


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
    font = font or resolve_figstep_font()
    image = Image.new("RGB", FIGSTEP_SIZE, "#FFFFFF")
    draw = ImageDraw.Draw(image)
    draw.text(
        FIGSTEP_XY,
        figstep_text(instruction),
        fill="#000000",
        font=_load_font(font.path, FIGSTEP_FONT_SIZE),
        spacing=FIGSTEP_SPACING,
    )
    return image


def _cache_dir() -> Path | None:
    setting = os.environ.get(RENDER_CACHE_ENV)
    if setting == "0":
        return None
    if setting:
        return Path(setting).expanduser()
    from rejalign_tasks.data import cache_root

    return cache_root() / "renders"


def render_key(kind: str, text: str, font: FontChoice) -> str:
    """A cache key covering everything that changes the pixels."""
    import PIL

    material = "\x00".join([kind, text, font.sha256, PIL.__version__])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def cached_render(kind: str, text: str, font: FontChoice, render) -> Image.Image:
    """Return ``render()``'s image, from the on-disk PNG cache when present.

    PNG is lossless, so a cached image is pixel-identical to a fresh render. Writes are atomic
    (temporary file + rename), so a crash never leaves a truncated PNG behind.
    """
    folder = _cache_dir()
    if folder is None:
        return render()
    key = render_key(kind, text, font)
    path = folder / kind / key[:2] / f"{key}.png"
    if path.is_file():
        try:
            with Image.open(path) as cached:
                return cached.convert("RGB")
        except OSError:
            logger.warning("ignoring unreadable cached render %s", path)
    image = render()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            image.save(tmp, format="PNG", compress_level=1)
        os.replace(tmp.name, path)
    except OSError as exc:  # a read-only cache must not stop an evaluation
        logger.warning("render cache %s not writable: %s", folder, exc)
    return image


def figstep_image(instruction: str, font: FontChoice | None = None) -> Image.Image:
    """FigStep image for ``instruction``: rendered on demand, cached on disk."""
    font = font or resolve_figstep_font()
    return cached_render("figstep", instruction, font, lambda: render_figstep(instruction, font))
