"""The data layer: IDX reader, search order and errors, bundled subset, npz files, CIFAR pickles,
augmentation and batching."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import robusteval.data as data
from robusteval.data import augment_crop_flip, iterate_batches, load_dataset, load_npz, read_idx
from robusteval.errors import UserError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")



@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No system datasets and no $ROBUSTEVAL_DATA: only what a test puts in ``tmp_path``."""
    monkeypatch.setattr(data, "SYSTEM_ROOTS", [tmp_path / "system"])
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    return tmp_path


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_idx_reader_on_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    labels = read_idx(DEBIAN_FMNIST / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and labels.dtype == np.uint8 and labels[0] == 9
    ds = load_dataset("fashion-mnist", split="test")
    assert ds.images.shape == (10_000, 1, 28, 28) and ds.images.dtype == torch.float32
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0 and ds.images.max() == 1.0
    assert ds.labels.dtype == torch.long and ds.labels[0].item() == 9 and ds.classes[9] == "Ankle boot"
    assert torch.equal(ds.ids, torch.arange(10_000)) and not ds.bundled
    part = load_dataset("fashion-mnist", n=5, offset=100)
    assert torch.equal(part.ids, torch.arange(100, 105)) and torch.equal(part.images, ds.images[100:105])
    # The bundled subset is exactly the first 1,000 test images.
    bundled = load_npz(data.BUNDLED_SUBSET)
    assert torch.equal(bundled.images, ds.images[:1000]) and torch.equal(bundled.labels, ds.labels[:1000])


def test_idx_reader_rejects_garbage(tmp_path):
    bad = tmp_path / "x-idx1-ubyte"
    bad.write_bytes(b"hello world")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(bad)
    header_only = tmp_path / "y-idx1-ubyte"
    header_only.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(UserError, match="does not match its header"):
        read_idx(header_only)


def test_bundled_subset_is_the_offline_fallback(offline):
    empty = offline / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="fashion-mnist test data not found in data_dir"):
        load_dataset("fashion-mnist", split="test", data_dir=empty)  # explicit: never another copy
    ds = load_dataset("fashion-mnist", split="test")
    assert ds.bundled and ds.source == "bundled subset (1000 images)"
    assert ds.images.shape == (1000, 1, 28, 28) and ds.labels[0].item() == 9
    assert torch.equal(ds.ids, torch.arange(1000)) and ds.mean == (0.5,) and ds.num_classes == 10
    tail = load_dataset("fashion-mnist", n=10, offset=990)
    assert torch.equal(tail.ids, torch.arange(990, 1000))
    with pytest.raises(UserError, match="bundled Fashion-MNIST test subset .* has 1000"):
        load_dataset("fashion-mnist", n=10, offset=995)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", split="train")  # no bundled train data
    with pytest.raises(UserError, match="data_dir .*nowhere does not exist"):
        load_dataset("fashion-mnist", data_dir=offline / "nowhere")


def test_missing_cifar10_names_the_paths_tried(offline, monkeypatch):
    empty = offline / "empty"
    empty.mkdir()
    monkeypatch.setenv(data.ENV_VAR, str(offline / "env"))
    with pytest.raises(UserError, match="cifar10 test data not found in data_dir"):
        load_dataset("cifar10", data_dir=empty)
    with pytest.raises(UserError) as err:
        load_dataset("cifar10")
    message = str(err.value)
    assert "\n" not in message and str(offline / "env") in message
    # the library names the argument, the CLI words it as a flag
    assert str(offline / "system" / "cifar10") in message and "--download" in err.value.as_flags()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_search_order_data_dir_then_env_then_system(offline, monkeypatch):
    def make(root: Path, label: int) -> Path:
        root.mkdir(parents=True)
        _write_idx(root / "t10k-images-idx3-ubyte", np.full((3, 28, 28), 255))
        _write_idx(root / "t10k-labels-idx1-ubyte", np.full(3, label))
        return root

    make(offline / "system" / "mnist", 1)
    assert load_dataset("mnist").labels.tolist() == [1, 1, 1]
    monkeypatch.setenv(data.ENV_VAR, str(make(offline / "env" / "MNIST" / "raw", 2).parent.parent))
    assert load_dataset("mnist").labels.tolist() == [2, 2, 2]  # torchvision's layout under the root
    ds = load_dataset("mnist", data_dir=make(offline / "explicit", 3))
    assert (
        ds.labels.tolist() == [3, 3, 3] and ds.images.max() == 1.0 and ds.source == str(offline / "explicit")
    )


def test_cifar_pickles_load_and_code_is_refused(offline):
    root = offline / "c" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({"data": images, "labels": [3, 1, 4, 1], "batch_label": "test"}, f, protocol=2)
    ds = load_dataset("cifar10", data_dir=offline / "c")
    assert ds.images.shape == (4, 3, 32, 32) and ds.labels.tolist() == [3, 1, 4, 1]
    torch.testing.assert_close(ds.images[1], torch.from_numpy(images[1].reshape(3, 32, 32)).float() / 255)
    assert ds.classes[3] == "cat" and ds.mean[0] == pytest.approx(125.3 / 255)

    class Evil:
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return (Path.touch, (self.marker,))

    pickle.loads(pickle.dumps(Evil(offline / "live"), protocol=2))  # the payload really runs code...
    assert (offline / "live").exists()
    marker = offline / "owned"
    with open(root / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(UserError, match="not a CIFAR python batch"):
        load_dataset("cifar10", data_dir=offline / "c")
    assert not marker.exists()  # ...but not through our loader


def test_imagenet_folder_is_decoded_lazily_at_224(offline):
    from PIL import Image

    val = offline / "imnet" / "val"
    for cls, shade in [("n01", 0), ("n02", 255)]:
        (val / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (300 + 50 * i, 260), (shade, 128, 0)).save(val / cls / f"{i}.png")
    (offline / "imnet" / "train").mkdir()  # must not be mistaken for a class
    ds = load_dataset("imagenet", data_dir=offline / "imnet", n=3, offset=1)
    assert ds.images.shape == (3, 3, 224, 224) and ds.labels.tolist() == [0, 1, 1]
    assert ds.ids.tolist() == [1, 2, 3] and ds.classes == ["n01", "n02"] and ds.mean == (0.5, 0.5, 0.5)
    batch = next(ds.batches(2))[0]
    assert batch.shape == (2, 3, 224, 224) and batch[0, 0].max() == 0 and batch[1, 0].min() == 1
    assert ds.subset(slice(1, 3)).images[0].shape == (3, 224, 224)
    with pytest.raises(UserError, match="data_dir .*nothing does not exist"):
        load_dataset("imagenet", data_dir=offline / "nothing")
    (offline / "empty-imnet").mkdir()
    with pytest.raises(UserError, match="imagenet test data not found .*one folder per class"):
        load_dataset("imagenet", data_dir=offline / "empty-imnet")


def test_npz_round_trip_layouts_and_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / "hwc.npz", x=hwc, y=labels)
    ds = load_dataset("npz", data_dir=tmp_path / "hwc.npz")
    assert ds.images.shape == (5, 3, 8, 8) and ds.labels.tolist() == labels.tolist()
    torch.testing.assert_close(ds.images, torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255)
    np.savez(tmp_path / "chw.npz", images=hwc.transpose(0, 3, 1, 2).astype(np.float32) / 255, labels=labels,
             ids=np.arange(100, 105), classes=np.array(["a", "b", "c"]))  # fmt: skip
    other = load_dataset(f"npz:{tmp_path / 'chw.npz'}", n=2, offset=3)
    torch.testing.assert_close(other.images, ds.images[3:5])
    assert other.ids.tolist() == [103, 104] and other.classes == ["a", "b", "c"]
    np.savez(tmp_path / "grey.npz", x=hwc[..., 0], y=labels)
    assert load_npz(tmp_path / "grey.npz").images.shape == (5, 1, 8, 8)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((2, 4, 4), np.uint8)}, "needs arrays 'x'"),
        ({"x": np.full((2, 4, 4), 2.0), "y": np.zeros(2, int)}, r"float images must be in \[0, 1\]"),
        ({"x": np.zeros((2, 5, 4, 4), np.uint8), "y": np.zeros(2, int)}, "1 or 3 channels"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, int)}, "one per image"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0.5, 1.0])}, "labels must be integers"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([-1, 0])}, "non-negative"),
        (
            {"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, 1], dtype=object)},
            "not an .npz of plain arrays",
        ),
    ],
)
def test_bad_npz_is_a_clear_error(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", allow_pickle=True, **arrays)
    with pytest.raises(UserError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_npz_non_archive_and_missing(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(UserError, match="text.npz"):
        load_npz(tmp_path / "text.npz")
    with pytest.raises(UserError, match="not found"):
        load_npz(tmp_path / "absent.npz")
    with pytest.raises(UserError, match="needs a file"):
        load_dataset("npz")


def test_unknown_names_and_splits():
    with pytest.raises(UserError, match="known: fashion-mnist"):
        load_dataset("cifar11")
    with pytest.raises(UserError, match="unknown split"):
        load_dataset("mnist", split="val")


def test_augment_crop_flip_is_a_reproducible_shifted_window():
    x = torch.rand(64, 3, 32, 32)
    a = augment_crop_flip(x, torch.Generator().manual_seed(5))
    b = augment_crop_flip(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, augment_crop_flip(x, torch.Generator().manual_seed(6)))
    # With zero padding and a unique value per pixel, every output is a window of the image, maybe flipped.
    img = torch.arange(1.0, 1 + 32 * 32).view(1, 1, 32, 32).repeat(200, 1, 1, 1)
    out = augment_crop_flip(img, torch.Generator().manual_seed(0), padding_mode="zeros")
    flips = shifts = 0
    for o in out[:, 0]:
        core = o[4:-4, 4:-4]  # always inside the image for offsets within ±4
        r, c = divmod(int(core[0, 0].item()) - 1, 32)
        flipped = core[0, 1] < core[0, 0]
        window = (
            img[0, 0, r : r + 24, c - 23 : c + 1].flip(1) if flipped else img[0, 0, r : r + 24, c : c + 24]
        )
        assert torch.equal(core, window)
        flips += bool(flipped)
        shifts += (r, c) != (4, 4) and (r, c) != (4, 27)
    assert 60 < flips < 140 and shifts > 150


def test_iterate_batches_covers_every_example_once():
    x, y, ids = torch.rand(10, 1, 2, 2), torch.arange(10), torch.arange(100, 110)
    plain = list(iterate_batches(x, y, ids, 4))
    assert [len(b[1]) for b in plain] == [4, 4, 2] and torch.equal(torch.cat([b[2] for b in plain]), ids)
    shuffled = list(iterate_batches(x, y, ids, 4, shuffle=True, generator=torch.Generator().manual_seed(0),
                                    drop_last=True))  # fmt: skip
    assert len(shuffled) == 2
    for bx, by, bid in shuffled:
        assert torch.equal(bid - 100, by) and torch.equal(bx, x[by])
    with pytest.raises(ValueError, match="Generator"):
        next(iterate_batches(x, y, ids, 4, shuffle=True))
