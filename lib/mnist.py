"""
mnist.py: MNIST's files for Textual MNIST (paper §4.2): the four IDX files (downloaded, size- and
md5-checked), read into uint8 arrays, the 60k training images split into train and validation, and
synthetic stand-in digits in the same files for the demo and the tests; run_splits: a training
run's splits and the files' hashes. The text and the prompt
the model sees are the paper's, in rigsa.py (to_text, prompt).
"""
import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch

from lib import util

MNIST_FILES = {  # name: (bytes, md5) of LeCun's originals
    "train-images-idx3-ubyte.gz": (9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte.gz": (28881, "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte.gz": (1648877, "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte.gz": (4542, "ec29112dd5afa0611ce80d1b7f02629c"),
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's mirror of the originals
MNIST_COUNTS = {"train": 60000, "test": 10000}
def mnist_dir(root):
    """--data-dir is the data root, and MNIST lives in <root>/mnist/."""
    return Path(root) / "mnist"


def ensure_mnist(data_dir, download=True, verify=True, names=tuple(MNIST_FILES)):
    """Make sure the IDX files are in data_dir, downloading what is missing. Sizes and md5s are
    pinned; verify=False accepts files that are there as they are (stand-in data: demo, tests)."""
    files = [(name, MNIST_MIRROR + name, "md5", MNIST_FILES[name][1], MNIST_FILES[name][0]) for name in names]
    util.ensure_files("MNIST", "mnist", data_dir, files, download, verify)
    return Path(data_dir)


def read_idx(path, magic):
    """One IDX file -> uint8 array, shape from its header. 2051 = images (N, H, W), 2049 = labels (N,)."""
    again = "delete it to download it again"
    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable IDX file ({e}); {again}") from None
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        raise ValueError(f"{path}: bad magic number (expected {magic}, an IDX "
                         f"{'image' if magic == 2051 else 'label'} file); {again}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: {len(data)} bytes end inside its header ({ndim} dimensions): truncated; {again}")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    if len(data) != 4 + 4 * ndim + math.prod(dims):
        raise ValueError(f"{path}: {len(data)} bytes do not match the header shape {dims} ("
                         f"{'truncated' if len(data) < 4 + 4 * ndim + math.prod(dims) else 'bytes beyond it'}); {again}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path, array):
    """uint8 array -> gzipped IDX file (magic 2051 for 3-D images, 2049 for 1-D labels), atomically."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    head = struct.pack(">I", 0x800 + a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)

    def write(tmp):   # no mtime, no name: the same digits give the same file, and sha256 (runs record it)
        with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as f:
            f.write(head + a.tobytes())
    util.atomic_write(path, write)


def load_mnist(data_dir, split, val_frac=0.01, seed=0, download=False, verify=True):
    """-> (images uint8 (N, H, W), labels long (N,)) for split train | val | test (load_mnist_splits)."""
    return load_mnist_splits(data_dir, (split,), val_frac, seed, download, verify)[split]


def load_mnist_splits(data_dir, splits, val_frac=0.01, seed=0, download=False, verify=True):
    """-> {split: (images uint8 (N, H, W), labels long (N,))} for splits among train | val | test,
    each IDX file read (and checked) once. Val is the fraction val_frac of the 60k training images,
    chosen by a seeded permutation (§4.2); train is the rest."""
    for split in splits:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split {split!r} is not train, val or test")
    out = {}
    parts = [(part, stem) for part, stem in (("train", "train"), ("test", "t10k"))
             if any((s == "test") == (part == "test") for s in splits)]
    names = lambda stem: [f"{stem}-{k}-idx{d}-ubyte.gz" for k, d in (("images", 3), ("labels", 1))]
    ensure_mnist(data_dir, download, verify, [n for _, stem in parts for n in names(stem)])   # every one missing: said once
    for part, stem in parts:
        wanted = [s for s in splits if (s == "test") == (part == "test")]
        files = [Path(data_dir) / n for n in names(stem)]
        x, y = read_idx(files[0], 2051), read_idx(files[1], 2049)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{files[0]}: {x.shape} images do not match {y.shape} labels in {files[1].name}")
        if min(x.shape[1:]) < 1:   # --no-verify skips the checksums and MNIST's size, never the structure
            raise ValueError(f"{files[0]}: images of {x.shape[1]} x {x.shape[2]} pixels; replace it with real "
                             f"(or stand-in) digits")
        if not len(y):
            raise ValueError(f"{files[1]}: holds no images; replace it (delete it to download it again)")
        if y.max() > 9:
            raise ValueError(f"{files[1]}: label {y.max()} is not a digit")
        if verify and (len(x) != MNIST_COUNTS[part] or x.shape[1:] != (28, 28)):
            raise ValueError(f"{files[0]}: {x.shape} is not MNIST's {MNIST_COUNTS[part]} x 28 x 28; "
                             f"--no-verify for stand-in data")
        x, y = torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))
        if part == "test":
            out["test"] = x, y
            continue
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_val = round(val_frac * len(x))
        for split in wanted:
            idx = (perm[:n_val] if split == "val" else perm[n_val:]).sort().values  # original order; training shuffles on its own
            out[split] = x[idx], y[idx]
    if "test" in out and len(out) > 1:
        check_sizes(data_dir, next(x for k, (x, _) in out.items() if k != "test"), out["test"][0])
    return {split: out[split] for split in splits}


def check_sizes(data_dir, train, test):
    """Training and test digits of one size (images (N, H, W)): a model trained, or shown shots, on one
    size and tested on another is asked another task, whose prompts have other lengths."""
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"{data_dir}: the training digits are {train.shape[1]} x {train.shape[2]} pixels and the test "
                         f"digits {test.shape[1]} x {test.shape[2]}; use the four files of one dataset")


def synthetic_digits(n, size=28, seed=0, noise=0.1, shift=True):
    """Stand-in digits for the demo and the tests: a 5x7 font, scaled and shifted at random, with
    pixel noise. -> (images uint8 (n, size, size), labels uint8 (n,))."""
    font = ["01110100011001110101110011000101110", "00100011000010000100001000010001110",
            "01110100010000100010001000100011111", "11111000100010000010000011000101110",
            "00010001100101010010111110001000010", "11111100001111000001000011000101110",
            "00110010001000011110100011000101110", "11111000010001000100010000100001000",
            "01110100011000101110100011000101110", "01110100011000101111000010001001100"]
    if size < 7:
        raise ValueError(f"synthetic digits need a grid of at least 7x7 (the font is 5x7), got {size}")
    glyphs = torch.tensor([[int(c) for c in g] for g in font], dtype=torch.float32).view(10, 7, 5)
    g = torch.Generator().manual_seed(seed)
    s = max(1, (size - 2) // 7)                                    # scale so the glyph fits
    labels = torch.randint(0, 10, (n,), generator=g)
    big = glyphs.repeat_interleave(s, 1).repeat_interleave(s, 2)  # (10, 7s, 5s)
    H, W = big.shape[1:]
    img = torch.zeros(n, size, size)
    dy = torch.randint(0, size - H + 1, (n,), generator=g) if shift else torch.full((n,), (size - H) // 2)
    dx = torch.randint(0, size - W + 1, (n,), generator=g) if shift else torch.full((n,), (size - W) // 2)
    ink = 150 + 105 * torch.rand(n, 1, 1, generator=g)
    for i in range(n):
        img[i, dy[i]:dy[i] + H, dx[i]:dx[i] + W] = big[labels[i]] * ink[i]
    flip = torch.rand(n, size, size, generator=g) < noise           # a few pixels lit or cleared
    img = torch.where(flip, 255 * torch.rand(n, size, size, generator=g), img)
    return img.round().clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


def write_synthetic_mnist(data_dir, n_train=2000, n_test=200, size=28, seed=0, noise=0.1, shift=True):
    """Synthetic digits in MNIST's four IDX files (read them with verify=False, --no-verify)."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stem, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = synthetic_digits(n, size, s, noise, shift)
        write_idx(d / f"{stem}-images-idx3-ubyte.gz", x.numpy())
        write_idx(d / f"{stem}-labels-idx1-ubyte.gz", y.numpy())
    return d


def run_splits(cfg):
    """A training run's data (§4.2): train, val (none with --val-frac 0) and test (none with
    --no-eval-test), --limit cutting val and test, and the sha256 of the MNIST files, which the run
    records. A split left empty (it would train on nothing, or report NaN) is refused. -> (data, hashes)."""
    folder = mnist_dir(cfg.data_dir)
    splits = ("train",) + ("val",) * (cfg.val_frac > 0) + ("test",) * cfg.eval_test
    data = load_mnist_splits(folder, splits, cfg.val_frac, cfg.split_seed, not cfg.offline, cfg.verify)
    if cfg.limit:
        data.update({k: (x[:cfg.limit], y[:cfg.limit]) for k, (x, y) in data.items() if k != "train"})
    for split, (x, _) in data.items():
        if not len(x):
            raise ValueError(f"--val-frac {cfg.val_frac} leaves the {split} split of the training images empty; choose "
                             f"a --val-frac that leaves images in both (0: no validation split)" if split != "test" else
                             f"{folder}: the test split holds no images; use other data, or --no-eval-test")
    return data, {n: util.file_hash(folder / n, "sha256") for n in MNIST_FILES if (folder / n).is_file()}
