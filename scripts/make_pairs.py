"""Writes the ID/OOD data-set pairs that choose dlsr's defaults (README, "Choosing the
defaults") as IDX files, from the assets scripts/fetch-assets.sh installs:

  mnist-train / mnist-test      MNIST-5k, every fifth image to test (the CSV is sorted
                                by label, so a head/tail split would hold out 8 and 9)
  mn07-train / mn07-test, mn89  MNIST digits 0-7 as ID (400 per class to train, the rest
                                to test), digits 8 and 9 as near OOD
  fm07-train / fm07-test, fm89  Fashion-MNIST classes 0-7 as ID (first 6000 training
                                images), bag and ankle boot (8, 9) as near OOD
  photos/                       the 60 CIFAR-10, CIFAR-100 and ImageNet samples of foolbox

usage: python3 scripts/make_pairs.py ASSETS OUT
"""
import gzip
import os
import shutil
import struct
import sys

assets, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)


def write(name, images):
    with gzip.open(os.path.join(out, name), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(images), 28, 28))
        for image in images:
            f.write(image)


def idx(images, labels):
    data, marks = gzip.open(images).read(), gzip.open(labels).read()
    n = struct.unpack(">I", data[4:8])[0]
    return [(data[16 + i * 784:16 + (i + 1) * 784], marks[8 + i]) for i in range(n)]


rows = [line.strip().split(",") for line in gzip.open(os.path.join(assets, "mnist/mnist_5k.csv.gz"), "rt")
        if line.strip()]
digits = [(bytes(int(v) for v in r[:784]), int(r[784])) for r in rows]
write("mnist-train.idx.gz", [im for i, (im, _) in enumerate(digits) if i % 5])
write("mnist-test.idx.gz", [im for i, (im, _) in enumerate(digits) if i % 5 == 0])
by_class = {}
for im, label in digits:
    by_class.setdefault(label, []).append(im)
write("mn07-train.idx.gz", [im for c in range(8) for im in by_class[c][:400]])
write("mn07-test.idx.gz", [im for c in range(8) for im in by_class[c][400:]])
write("mn89.idx.gz", [im for c in (8, 9) for im in by_class[c]])

fm = os.path.join(assets, "fashion-mnist")
train = idx(os.path.join(fm, "train-images-idx3-ubyte.gz"), os.path.join(fm, "train-labels-idx1-ubyte.gz"))
test = idx(os.path.join(fm, "t10k-images-idx3-ubyte.gz"), os.path.join(fm, "t10k-labels-idx1-ubyte.gz"))
write("fm07-train.idx.gz", [im for im, label in train if label < 8][:6000])
write("fm07-test.idx.gz", [im for im, label in test if label < 8][:2000])
write("fm89.idx.gz", [im for im, label in test if label >= 8][:2000])

photos = os.path.join(out, "photos")
os.makedirs(photos, exist_ok=True)
for name in sorted(os.listdir(os.path.join(assets, "foolbox"))):
    if name.startswith(("cifar", "imagenet")):
        shutil.copy(os.path.join(assets, "foolbox", name), os.path.join(photos, name))
