"""The real datasets betavae.py trains on besides its built-in shapes, read from files on disk.

    python betavae.py train --dataset dsprites --data-dir data --download   # DeepMind's dSprites npz
    python betavae.py train --dataset mnist --data-dir data --download      # or fashion-mnist, celeba
    python betavae.py train --dataset folder --data-dir my_images           # every image below a folder

Nothing is fetched unless `train --download` asks for it; each loader names the files it expects. Every
dataset yields (C, 64, 64) float images in [0, 1]; dSprites also its ground-truth factors, so `evaluate`
scores a model trained on it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from infer_onnx import UserError, read_image

IMAGE_SIZE = 64  # betavae's images are 64x64
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".tif", ".tiff"}
DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_URL = "https://github.com/deepmind/dsprites-dataset/raw/master/" + DSPRITES_FILE
DSPRITES_FACTORS = ("color", "shape", "scale", "orientation", "pos_x", "pos_y")


class DSprites(Dataset):
    """DeepMind's dSprites npz (or a subset saved in the same format) with its ground-truth factors."""

    channels = 1

    def __init__(self, path: Path):
        try:
            with np.load(path) as npz:  # never unpickles: 'metadata' (a pickled dict) is not read
                images, classes = npz["imgs"], npz["latents_classes"]
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{path} is not a dSprites npz with 'imgs' and 'latents_classes' ({e})")
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(classes) != len(images):
            raise UserError(f"{path}: expected imgs (N, 64, 64) and latents_classes (N, K), got "
                            f"{images.shape} and {classes.shape}")
        names = DSPRITES_FACTORS[-classes.shape[1]:]
        varying = [k for k in range(classes.shape[1]) if np.unique(classes[:, k]).size > 1]  # drops colour
        self.factor_names = tuple(names[k] for k in varying)
        self.classes = classes[:, varying].astype(np.int64)
        self.factor_sizes = tuple(int(c.max()) + 1 for c in self.classes.T)
        self.packed = np.packbits(images.astype(bool), axis=-1)  # (N, 64, 8): binary images, 8x smaller
        self.rows = np.full(math.prod(self.factor_sizes), -1, dtype=np.int64)  # factor grid point -> row
        self.rows[np.ravel_multi_index(self.classes.T, self.factor_sizes)] = np.arange(len(self.classes))

    def __len__(self) -> int:
        return len(self.classes)

    def factors(self, indices) -> torch.Tensor:
        return torch.from_numpy(self.classes[np.asarray(indices)])

    def images(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.unpackbits(self.packed[rows], axis=-1)).float().unsqueeze(1)

    def render(self, factors, device=None) -> torch.Tensor:
        """The images with the given factor classes, looked up in the file (on `device`, as render_shapes)."""
        rows = self.rows[np.ravel_multi_index(np.asarray(factors).T, self.factor_sizes)]
        if (rows < 0).any():
            raise UserError("this dSprites file lacks some factor combinations asked for")
        return self.images(rows).to(device)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images(np.array([index]))[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return list(self.images(np.asarray(indices)))


class ImageFiles(Dataset):
    """Every image below a folder, recursively: centre-cropped to a square and resized to 64x64; grey
    (1 channel) when every image is, else RGB."""

    def __init__(self, root: Path):
        from PIL import Image
        if not root.is_dir():
            raise UserError(f"--data-dir {root} is not a folder")
        self.files, bad, grey = [], [], True
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            try:
                with Image.open(path) as image:
                    grey &= image.mode in ("1", "L", "LA", "I", "I;16", "F")
                    image.verify()
                self.files.append(path)
            except Exception:  # PIL raises many types for a broken file; all mean "skip it"
                bad.append(path.name)
        if bad:
            print(f"warning: skipped {len(bad)} unreadable image(s) in {root}: {', '.join(bad[:5])}"
                  + (" ..." if len(bad) > 5 else ""))
        if not self.files:
            raise UserError(f"no readable image ({', '.join(sorted(IMAGE_SUFFIXES))}) below {root}")
        self.channels = 1 if grey else 3

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        array = read_image(self.files[index], self.channels, IMAGE_SIZE, quiet=True)[0]
        return torch.from_numpy(array)


class ArrayImages(Dataset):
    """Images held in memory: uint8 (N, C, h, w), or the first item of a torchvision dataset's pairs."""

    def __init__(self, images, channels: int):
        self.images, self.channels = images, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        if isinstance(self.images, Dataset):  # CelebA: (image, target) pairs, already 64x64 floats
            return [self.images[i][0] for i in indices]
        x = self.images[indices].float() / 255  # a whole batch resized at once
        return list(F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                                  align_corners=False))


def load_dsprites(name: str, data_dir: Path, download: bool):
    path = data_dir / DSPRITES_FILE
    if not path.is_file() and download:
        from torchvision.datasets.utils import download_url
        try:
            download_url(DSPRITES_URL, str(data_dir), DSPRITES_FILE)
        except Exception as e:  # urllib raises many types when offline
            raise UserError(f"could not download {DSPRITES_URL} ({e.__class__.__name__}); offline? "
                            f"place {DSPRITES_FILE} in {data_dir} by hand")
    if not path.is_file():
        raise UserError(f"dsprites needs {path} (from github.com/deepmind/dsprites-dataset); add --download "
                        f"to fetch it, or pass --data-dir")
    return DSprites(path), None


def load_mnist(name: str, data_dir: Path, download: bool):
    """MNIST or Fashion-MNIST from torchvision's raw IDX layout; the official test split validates."""
    from torchvision import datasets
    kind = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        train, test = (kind(str(data_dir), train=split, download=download) for split in (True, False))
    except (RuntimeError, OSError):  # torchvision's "Dataset not found", or every mirror failed
        raw = data_dir / kind.__name__ / "raw"
        files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
        if download:
            raise UserError(f"could not download {name} (offline?); place {files} in {raw} by hand")
        raise UserError(f"{name} needs {files} in {raw}; add --download to fetch them")
    return ArrayImages(train.data[:, None], 1), ArrayImages(test.data[:, None], 1)


def load_celeba(name: str, data_dir: Path, download: bool):
    """CelebA's aligned faces, centre crop 148 then 64x64 (the usual VAE preprocessing); official splits."""
    from torchvision import datasets, transforms
    prepare = transforms.Compose([transforms.CenterCrop(148), transforms.Resize(IMAGE_SIZE), transforms.ToTensor()])
    try:
        train, valid = (datasets.CelebA(str(data_dir), split=split, target_type=[], transform=prepare,
                                        download=download) for split in ("train", "valid"))
    except Exception:  # missing files, a failed integrity check, or Google Drive's quota error
        raise UserError(f"celeba needs {data_dir / 'celeba'}/img_align_celeba/ and its list_*.txt and "
                        f"identity_CelebA.txt files; --download often hits Google Drive's quota: download them from "
                        f"mmlab.ie.cuhk.edu.hk/projects/CelebA.html and place them there by hand")
    return ArrayImages(train, 3), ArrayImages(valid, 3)


def load_folder(name: str, data_dir: Path, download: bool):
    return ImageFiles(data_dir), None


# name -> loader(name, data_dir, download) returning (the dataset, its official validation split or None)
LOADERS = {"dsprites": load_dsprites, "mnist": load_mnist, "fashion-mnist": load_mnist, "celeba": load_celeba,
           "folder": load_folder}


def load(name: str, data_dir, download: bool = False) -> tuple[Dataset, Optional[Dataset]]:
    """(the dataset, its official validation split or None) of a dataset read from files in data_dir."""
    return LOADERS[name](name, Path(data_dir), download)


