"""Build the bundled demo set: a stratified Fashion-MNIST subset (MIT licence).

Source: Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), which installs the
upstream IDX files under /usr/share/datasets/fashion-mnist. Run once; the output is committed.

    python tools/make_demo_data.py [--src DIR] [--out funmatch/demo_data/fashion_mnist_subset.npz]
"""

import argparse
import gzip
from pathlib import Path

import numpy as np

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(picks))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default="funmatch/demo_data/fashion_mnist_subset.npz")
    ap.add_argument("--train", type=int, default=800, help="train images per class")
    ap.add_argument("--val", type=int, default=100, help="val images per class (from upstream train)")
    ap.add_argument("--test", type=int, default=200, help="test images per class (from upstream t10k)")
    args = ap.parse_args()
    src = Path(args.src)
    x, y = read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "train-labels-idx1-ubyte.gz")
    xt, yt = read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    both = stratified(y, args.train + args.val, rng)
    rng.shuffle(both)
    is_val = np.zeros(len(both), bool)
    for c in range(len(CLASSES)):
        is_val[np.flatnonzero(y[both] == c)[: args.val]] = True
    train, val = np.sort(both[~is_val]), np.sort(both[is_val])
    test = stratified(yt, args.test, rng)
    np.savez_compressed(
        args.out,
        classes=np.array(CLASSES),
        train_images=x[train],
        train_labels=y[train],
        val_images=x[val],
        val_labels=y[val],
        test_images=xt[test],
        test_labels=yt[test],
    )
    print(f"wrote {args.out}: train {len(train)} val {len(val)} test {len(test)}")


if __name__ == "__main__":
    main()
