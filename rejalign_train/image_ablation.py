"""``mix --refusal_images``: the refusal records' images replaced by blank or noise, or dropped.

(And ``--refusal_image_root``: the kept images' paths made absolute from another folder, so that
a refusal source whose images sit elsewhere mixes with normal data under fit's one image root.)

The paper claims that image content contributes little to what safety finetuning teaches. The
ablation keeps every refusal record (same draw, same turns, same order) and changes only its
images: ``blank`` (one white image shared by all), ``noise`` (one uniform RGB noise image per
image of each record, seeded by the mix seed and the record's position in the refusal draw),
``drop`` (text only: the images and their ``<image>`` placeholders are removed). Normal records
keep their images.

Generated images are written beside the output, in ``<stem>.images/`` (``blank.png``,
``noise/<record>-<image>.png``), and referenced by their absolute path, which fit reads whatever
its ``--image_root`` is. The pixels are a function of the seed and positions only.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rejalign_tasks.contracts import IMAGE_PLACEHOLDER, atomic_path

IMAGE_MODES = ("keep", "blank", "noise", "drop")
ImageMode = Literal["keep", "blank", "noise", "drop"]
# LLaVA-1.5's CLIP input size; every processor resizes it anyway.
SIZE = (336, 336)
BLANK_RGB = (255, 255, 255)


def images_dir(output: str | Path) -> Path:
    """``mixed.jsonl`` -> ``mixed.images`` (same folder)."""
    output = Path(output)
    return output.with_name(output.stem + ".images")


def strip_placeholders(text: str) -> str:
    """User text without its ``<image>`` placeholders (and the newline that set each apart)."""
    text = text.replace(IMAGE_PLACEHOLDER + "\n", "").replace("\n" + IMAGE_PLACEHOLDER, "")
    return text.replace(IMAGE_PLACEHOLDER, "")


@dataclass
class ImageAblation:
    """Decides the refusal records' new images; :meth:`write` makes the files."""

    mode: ImageMode
    output: Path
    seed: int
    root: str | None = None  # keep: the folder the kept images' relative paths start from
    planned: dict[Path, tuple[str, int, int]] = field(default_factory=dict)
    records_changed: int = 0

    @property
    def folder(self) -> Path:
        return images_dir(self.output).resolve()

    def _replacement(self, position: int, j: int) -> str:
        if self.mode == "blank":
            path = self.folder / "blank.png"
        else:
            path = self.folder / "noise" / f"{position:06d}-{j}.png"
        self.planned[path] = (self.mode, position, j)
        return str(path)

    def _new_images(self, images: list[str], position: int) -> list[str]:
        if self.mode == "keep":
            base = Path(self.root).expanduser().resolve()  # type: ignore[arg-type]
            return [str(base / p) for p in images]  # an absolute path stays as it is
        return [self._replacement(position, j) for j in range(len(images))]

    def _active(self) -> bool:
        return self.mode != "keep" or self.root is not None

    def apply_raw(self, raw: dict, position: int) -> dict:
        """An upstream-layout LLaVA record (``image`` a path or a list), edited in place."""
        if not self._active() or not raw.get("image"):
            return raw
        self.records_changed += 1
        image = raw["image"]
        images = image if isinstance(image, list) else [image]
        if self.mode == "drop":
            del raw["image"]
            for turn in raw["conversations"]:
                if turn.get("from") in ("human", "user"):
                    turn["value"] = strip_placeholders(turn["value"])
            return raw
        new = self._new_images(images, position)
        raw["image"] = new if isinstance(image, list) else new[0]
        return raw

    def apply_record(self, record: dict, position: int) -> dict:
        """A normalised record (``images`` and ``messages``), edited in place."""
        if not self._active() or not record["images"]:
            return record
        self.records_changed += 1
        if self.mode == "drop":
            record["images"] = []
            for message in record["messages"]:
                if message["role"] == "user":
                    message["content"] = strip_placeholders(message["content"])
            return record
        record["images"] = self._new_images(record["images"], position)
        return record

    def write(self) -> list[Path]:
        """Write the planned images (a previous run's folder is removed first); their paths."""
        from PIL import Image

        folder = self.folder
        if folder.exists():
            shutil.rmtree(folder)
        if not self.planned:
            return []
        for path, (mode, position, j) in sorted(self.planned.items()):
            path.parent.mkdir(parents=True, exist_ok=True)
            if mode == "blank":
                image = Image.new("RGB", SIZE, BLANK_RGB)
            else:
                rng = random.Random(f"rejalign-noise-{self.seed}-{position}-{j}")
                image = Image.frombytes("RGB", SIZE, rng.randbytes(SIZE[0] * SIZE[1] * 3))
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        return sorted(self.planned)

    def info(self) -> dict[str, Any]:
        """What the manifest says about the ablation."""
        return {
            "mode": self.mode,
            "root": str(Path(self.root).expanduser().resolve()) if self.root else None,
            "records_changed": self.records_changed,
            "size": list(SIZE) if self.mode in ("blank", "noise") else None,
            "folder": str(self.folder) if self.planned else None,
            "files": len(self.planned),
            "noise_seed": (
                f"random.Random('rejalign-noise-{self.seed}-<record>-<image>').randbytes"
                if self.mode == "noise"
                else None
            ),
        }
