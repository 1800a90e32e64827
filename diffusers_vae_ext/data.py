"""Images in and out: robust loading, [-1, 1] tensors, image folders and the built-in sample photos.

Every path into the package (training, latent statistics, the latent cache, `diffusers-vae reconstruct`) reads
images through `load_image_rgb`, so odd files are handled one way everywhere: palette, grayscale, 16-bit, CMYK
and alpha images become correct 8-bit RGB, and files that are not images raise `UnreadableImageError` naming
the file and the reason.

Pixels are normalised to [-1, 1] (`x / 127.5 - 1`), the range diffusers' VAEs are trained on and that the
pipelines' image processors produce. Other normalisations (ImageNet mean/std, [0, 1]) hurt a VAE badly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .optional import require

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CAPTION_EXTENSIONS = (".txt", ".caption")

# Truncated files must fail loudly, not come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImageError(ValueError):
    """A file that cannot be turned into an RGB image; `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a viewer shows it.

    Alpha is composited over `background` (a plain `.convert("RGB")` turns transparent pixels black); 16-bit and
    32-bit integer images are rescaled from their real range instead of being clipped to 255; EXIF rotation is
    applied.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            peak = max(float(array.max()), 1.0) if array.max() > 1.0 else 1.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_image_rgb(path: str | os.PathLike) -> Image.Image:
    """Open `path` as an 8-bit RGB PIL image, or raise `UnreadableImageError` saying why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        reason = str(err) or type(err).__name__
        if isinstance(err, Image.UnidentifiedImageError):
            reason = "not an image file PIL can read"
        elif "truncated" in reason.lower():
            reason = f"truncated or corrupt image ({reason})"
        raise UnreadableImageError(path, reason) from err


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Tensor (C, H, W) in [-1, 1] -> PIL image (values outside the range are clipped)."""
    array = tensor.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    array = array.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def to_model_channels(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    """Adapt an RGB tensor (3, H, W) (or a video (3, T, H, W)) to a model with 1 or 3 input channels.

    1 channel = luminance, ITU-R 601 weights.
    """
    if channels == tensor.shape[0]:
        return tensor
    if channels == 1 and tensor.shape[0] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=tensor.dtype).view(3, *([1] * (tensor.ndim - 1)))
        return (tensor * weights).sum(0, keepdim=True)
    raise ValueError(f"Cannot adapt a {tensor.shape[0]}-channel image to a model with {channels} input channels.")


def resize_and_crop(
    image: Image.Image, size: tuple[int, int], center_crop: bool = True
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `image` so it covers `size` = (height, width), then crop to it.

    Returns the cropped image and the crop's (top, left) in the resized image, which SDXL's micro-conditioning
    (`crops_coords_top_left`) needs. Without `center_crop` the crop is anchored at the top-left corner.
    """
    target_h, target_w = size
    scale = max(target_h / image.height, target_w / image.width)
    resized_w, resized_h = max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    top = (resized_h - target_h) // 2 if center_crop else 0
    left = (resized_w - target_w) // 2 if center_crop else 0
    return image.crop((left, top, left + target_w, top + target_h)), (top, left)


def list_image_files(root: str | os.PathLike) -> list[Path]:
    """All files under `root` (recursive, sorted) whose extension looks like an image.

    Raises `FileNotFoundError` for a missing folder and `ValueError` for a folder with no image files, with the
    extensions that were looked for, so an empty or mistyped `--train_data_dir` fails before any work starts.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {str(root)!r} does not exist or is not a directory.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(
            f"No images found in {str(root)!r} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}). "
            "Point --train_data_dir at a folder of images."
        )
    return files


def metadata_records(text: str, where: str) -> Iterator[dict[str, Any]]:
    """The lines of a `metadata.jsonl` (HF imagefolder) that name a `file_name`, parsed; blank lines are passed
    over and a line that is not JSON raises ValueError naming `where` (the file) and its line number."""
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}:{line_number}: not valid JSON ({err}).") from err
        if "file_name" in record:
            yield record


def read_captions(root: str | os.PathLike, files: list[Path], caption_column: str = "text") -> dict[str, str]:
    """Captions keyed by path relative to `root`, from `metadata.jsonl` (HF imagefolder) or sidecar files.

    `metadata.jsonl` lines look like `{"file_name": "a/b.png", "text": "a caption"}`; a sidecar `b.txt` or
    `b.caption` next to `b.png` is used when the metadata has no entry. Images without either get "".
    """
    root = Path(root)
    captions: dict[str, str] = {}
    for metadata in sorted(root.rglob("metadata.jsonl")):
        base = metadata.parent
        for record in metadata_records(metadata.read_text(encoding="utf-8"), str(metadata)):
            key = (base / record["file_name"]).relative_to(root).as_posix()
            captions[key] = str(record.get(caption_column, ""))
    for file in files:
        key = file.relative_to(root).as_posix()
        if key in captions:
            continue
        for extension in CAPTION_EXTENSIONS:
            sidecar = file.with_suffix(extension)
            if sidecar.is_file():
                captions[key] = sidecar.read_text(encoding="utf-8").strip()
                break
    return captions


SAMPLE_PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def sample_photos(num_faces: int = 0) -> dict[str, Image.Image]:
    """The built-in real photographs shipped in scikit-image's wheel, as RGB PIL images (no download).

    `num_faces` adds that many 25x25 grayscale faces from `lfw_subset()` (upscaled to 64x64, as RGB).
    """
    try:
        from skimage import data as skdata
    except ImportError as err:  # pragma: no cover - scikit-image is a declared dependency
        raise ImportError("The built-in sample photos need scikit-image: pip install scikit-image") from err
    photos = {}
    for name in SAMPLE_PHOTO_NAMES:
        photos[name] = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    if num_faces:
        faces = skdata.lfw_subset()[:num_faces]
        for index, face in enumerate(faces):
            gray = Image.fromarray((face * 255).round().astype(np.uint8), mode="L")
            photos[f"face_{index:03d}"] = gray.resize((64, 64), Image.Resampling.BICUBIC).convert("RGB")
    return photos


def write_sample_photos(folder: str | os.PathLike, num_faces: int = 0) -> list[Path]:
    """Write the sample photos as PNG files into `folder` (used by demos, tests and benchmarks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in sample_photos(num_faces).items():
        path = folder / f"{name}.png"
        image.save(path)
        paths.append(path)
    return paths


def import_datasets():
    """The `datasets` module, or a `MissingDependencyError` (an ImportError) naming the pip command."""
    return require("datasets", "--dataset_name (a `datasets` dataset)")


def open_dataset(name_or_path: str | os.PathLike, split: str = "train"):
    """A `datasets.Dataset`: a folder written by `save_to_disk` (a Dataset or a DatasetDict), else a hub name.

    For a DatasetDict the `split` is taken, with an error listing the splits when it is missing.
    """
    datasets = import_datasets()
    name = str(name_or_path)
    if Path(name).exists():
        dataset = datasets.load_from_disk(name)
    else:
        dataset = datasets.load_dataset(name, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{name} has splits {list(dataset)}, not {split!r}: pass --dataset_split.")
        dataset = dataset[split]
    return dataset


# ============================================================================================ training images


def augmentation_rng(seed: int, epoch: int, key: str, repeat: int = 0) -> np.random.Generator:
    """The random generator of one sample's crop and flip: a pure function of (seed, epoch, sample key, repeat).

    The key is the image's content hash (`cache.sources.content_hash` of its bytes) wherever the bytes are known,
    so an image gets the same crop whichever path, worker, process or position serves it (a folder and the same
    images as webdataset shards train identically), and a resumed run sees exactly the same pixels.
    """
    digest = hashlib.sha256(f"{seed}\x00{epoch}\x00{key}\x00{repeat}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def content_key(data: bytes) -> str:
    """The sample key of an image's bytes (the same digest as the latent cache's `content_hash`)."""
    return hashlib.sha256(data).hexdigest()[:16]


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """`image` with its short side resized to `size` (bicubic), the aspect ratio kept; as it is when already so."""
    scale = size / min(image.size)
    target = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    return image if target == image.size else image.resize(target, Image.Resampling.BICUBIC)


def random_crop_and_flip(
    image: Image.Image,
    resolution: int,
    resize_to: int,
    rng: np.random.Generator,
    random_crop: bool = True,
    random_flip: bool = False,
) -> Image.Image:
    """Resize the short side to `resize_to`, crop a `resolution` square (random or centred), flip with p = 1/2."""
    image = resize_short_side(image, resize_to)
    if random_crop:
        left = int(rng.integers(0, image.width - resolution + 1))
        top = int(rng.integers(0, image.height - resolution + 1))
    else:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


class TrainingImageDataset(torch.utils.data.Dataset):
    """Training images: resize the short side to `resolution`, crop a square, optionally flip; [-1, 1] tensors.

    Args:
        images: image files, encoded image bytes, or PIL images (the built-in sample photos).
        resolution: side of the square crops.
        resize_to: the short side is resized to this before cropping (default `resolution`: the crop is most of
            the image, as in diffusers' examples); larger values train on patches at a finer scale.
        channels: the model's `in_channels` (1 = luminance, 3 = RGB).
        random_crop: random crops for training, centre crops for validation.
        random_flip: horizontal flips with probability 1/2.
        seed: seed of the augmentations; with `set_epoch` they differ per epoch and are reproducible.
        min_length: repeat the images until an epoch holds at least this many samples (tiny datasets still fill
            a batch on every process); repeats get their own crops.

    Item `i` is image `i % len(images)`, repeat `i // len(images)`; its crop and flip come from
    `augmentation_rng(seed, epoch, key, repeat)`, the key being the content hash of a file's or bytes' content; for
    PIL images from `numpy.random.default_rng([seed, epoch, i])`. An unreadable file is reported with a warning and replaced by the next readable
    image, so one bad file does not stop a long run; the folder listing has already refused folders with no images.
    """

    def __init__(
        self,
        images: Sequence[Path] | Sequence[bytes] | Sequence[Image.Image],
        resolution: int,
        channels: int = 3,
        random_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        min_length: int = 1,
        resize_to: int | None = None,
    ):
        if not images:
            raise ValueError("TrainingImageDataset got no images.")
        # Any sequence works; a lazy one (e.g. rows of a `datasets` dataset) is read item by item.
        self.images = images if isinstance(images, Sequence) else list(images)
        self.resolution = resolution
        self.resize_to = max(resize_to or resolution, resolution)
        self.channels = channels
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.repeats = max(1, -(-min_length // len(self.images)))
        self.epoch = 0
        # Photos held in memory (the built-in ones) are resized once, not per sample: the resize does not depend on
        # the epoch, and it was most of a small model's data time (2 ms per 512 px photo at 64 px).
        self._resized: dict[int, Image.Image] | None = {} if isinstance(self.images, list) else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def _load(self, index: int) -> tuple[Image.Image, str | None]:
        for offset in range(len(self.images)):
            position = (index + offset) % len(self.images)
            item = self.images[position]
            if isinstance(item, Image.Image):
                return item, None
            try:
                if isinstance(item, (bytes, bytearray)):
                    return load_image_rgb(io.BytesIO(item)), content_key(bytes(item))
                data = Path(item).read_bytes()
                try:
                    return load_image_rgb(io.BytesIO(data)), content_key(data)
                except UnreadableImageError as err:
                    raise UnreadableImageError(item, err.reason) from err
            except UnreadableImageError as err:
                warnings.warn(f"Skipping unreadable training image {err}", stacklevel=2)
        raise ValueError("None of the training images could be read; see the warnings above.")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        position = index % len(self.images)
        image, key = self._load(position)
        if key is None:  # PIL images (the built-in photos, `datasets` rows): keyed by position, as always
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if self._resized is not None and image is self.images[position]:
                if position not in self._resized:
                    self._resized[position] = resize_short_side(image, self.resize_to)
                image = self._resized[position]
        else:
            rng = augmentation_rng(self.seed, self.epoch, key, index // len(self.images))
        image = random_crop_and_flip(image, self.resolution, self.resize_to, rng, self.random_crop, self.random_flip)
        return {"pixel_values": to_model_channels(pil_to_tensor(image), self.channels)}


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random permutation per epoch, seeded by (seed, epoch): `set_epoch` makes a resumed run replay the order.

    accelerate's prepared DataLoader forwards `set_epoch` to it and shards its batches across processes.
    """

    def __init__(self, length: int, seed: int = 0):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())
