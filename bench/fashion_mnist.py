"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, converted to Parquet that vaeforge reads.

    .venv/bin/python bench/fashion_mnist.py [--out data/fashion-mnist]

Writes train.parquet (60,000 rows) and test.parquet (10,000 rows) in the Hugging Face image layout:
`image` {bytes: PNG, path} and `label` (the class name), so `vaeforge train --data .../train.parquet`
reads them with no options; vaeforge turns the 28x28 grey images into 64x64 RGB as it loads them.
The package is installed with apt-get when it is missing and we are root; nothing is downloaded otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"
)  # fmt: skip


def ensure_package() -> Path:
    """The idx directory, installing the Debian package first when it is absent."""
    if not (IDX_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise SystemExit(f"{IDX_DIR} is missing: run `sudo apt-get install -y {PACKAGE}`")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", PACKAGE], check=True, env=env)
    return IDX_DIR


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip): big-endian magic with the number of dimensions, then the sizes, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, path: Path, split: str) -> None:
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG")
        blobs.append(buf.getvalue())
    table = pa.table(
        {
            "image": pa.StructArray.from_arrays(
                [pa.array(blobs, pa.binary()), pa.array([f"{split}/{i:05d}.png" for i in range(len(blobs))])],
                names=["bytes", "path"],
            ),
            "label": pa.array([CLASSES[i] for i in labels]),
        }
    )
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=5000)
    tmp.replace(path)


def prepare(out: Path) -> tuple[Path, Path]:
    """(train.parquet, test.parquet) under `out`, converted once."""
    idx = ensure_package()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        path = out / f"{split}.parquet"
        if not path.is_file():
            images = read_idx(idx / f"{prefix}-images-idx3-ubyte.gz")
            labels = read_idx(idx / f"{prefix}-labels-idx1-ubyte.gz")
            write_split(images, labels, path, split)
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/fashion-mnist"))
    args = ap.parse_args()
    for path in prepare(args.out):
        print(f"{path}  {pq.read_metadata(path).num_rows:,} rows")


if __name__ == "__main__":
    main()
