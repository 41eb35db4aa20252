"""DataModules: real datasets from disk, the in-memory batch iterable, splits, errors that name the fix."""

import pickle
from pathlib import Path

import pytest
import torch

from diffusion_lab.data import (
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    UnreadableImageError,
    to_uint8,
)
from diffusion_lab.data.base import default_data_root
from diffusion_lab.data.batches import InMemoryBatches
from diffusion_lab.errors import ConfigError
from tests.helpers import write_cifar10, write_idx_dataset, write_image_folder


def test_digits_are_scikit_learns_real_digits_in_uint8():
    from sklearn.datasets import load_digits

    datamodule = DigitsDataModule(batch_size=32)
    datamodule.setup()
    train, _ = datamodule.splits["train"]
    val, val_labels = datamodule.splits["val"]
    assert train.shape == (1617, 1, 8, 8) and val.shape == (180, 1, 8, 8) and train.dtype == torch.uint8
    assert train.max() == 255 and train.min() == 0
    assert set(val_labels.tolist()) == set(range(10))
    # Held-out images are real digits, disjoint from training: each one occurs in scikit-learn's set.
    real = torch.from_numpy(load_digits().images * (255 / 16)).round().to(torch.uint8)
    first = val[0, 0]
    assert any(torch.equal(first, image) for image in real)


def test_batches_arrive_in_minus_one_to_one():
    datamodule = DigitsDataModule(batch_size=16)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    images, labels = datamodule.prepare_batch(batch, training=True)
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    assert images.min() == -1  # the digits' black background
    assert torch.equal(to_uint8(images), batch[0])
    assert labels.shape == (16,)


def test_resizing_to_image_size():
    datamodule = DigitsDataModule(batch_size=16, image_size=16)
    datamodule.setup()
    assert datamodule.splits["train"][0].shape[-2:] == (16, 16)


def test_in_memory_batches_shard_ranks_disjointly_and_equally():
    images = torch.arange(103).view(103, 1, 1, 1)
    shards = [
        InMemoryBatches(images, None, 10, shuffle=True, drop_last=True, seed=3, rank=r, world_size=3) for r in range(3)
    ]
    seen = [torch.cat([b for b, _ in shard]).flatten().tolist() for shard in shards]
    assert all(len(s) == 30 for s in seen) and len({len(shard) for shard in shards}) == 1
    assert len(set(seen[0]) | set(seen[1]) | set(seen[2])) == 90


def test_in_memory_batches_reshuffle_each_epoch_and_resume_exactly():
    images = torch.arange(40).view(40, 1, 1, 1)
    batches = InMemoryBatches(images, None, 4, shuffle=True, drop_last=True, seed=0)
    epoch0 = [b.flatten().tolist() for b, _ in batches]
    epoch1 = [b.flatten().tolist() for b, _ in batches]
    assert epoch0 != epoch1 and sorted(i for batch in epoch0 for i in batch) == list(range(40))
    # Stop after 3 batches of epoch 2, checkpoint, and continue in a fresh iterable.
    iterator = iter(batches)
    taken = [next(iterator)[0].flatten().tolist() for _ in range(3)]
    state = batches.state_dict()
    resumed = InMemoryBatches(images, None, 4, shuffle=True, drop_last=True, seed=0)
    resumed.load_state_dict(state)
    rest = [b.flatten().tolist() for b, _ in resumed]
    fresh = InMemoryBatches(images, None, 4, shuffle=True, drop_last=True, seed=0)
    fresh.load_state_dict({"epoch": 2, "batches_done": 0})
    assert taken + rest == [b.flatten().tolist() for b, _ in fresh]


def test_validation_batches_cover_every_image_once():
    images = torch.arange(23).view(23, 1, 1, 1)
    batches = InMemoryBatches(images, None, 5, shuffle=False, drop_last=False)
    assert torch.cat([b for b, _ in batches]).flatten().tolist() == list(range(23))


def test_global_batch_size_must_split_over_processes(monkeypatch):
    datamodule = DigitsDataModule(batch_size=30)
    monkeypatch.setattr(datamodule, "_rank_and_world", lambda: {"rank": 0, "world_size": 4})
    with pytest.raises(ConfigError, match=r"data.batch_size=30 is global and must split evenly over the 4 processes"):
        datamodule.train_dataloader()


def test_mnist_from_the_data_dir(mnist_root):
    datamodule = MNISTDataModule(root=str(mnist_root), batch_size=128)
    datamodule.setup()
    train, labels = datamodule.splits["train"]
    val, _ = datamodule.splits["val"]
    assert train.shape == (60000, 1, 28, 28) and val.shape == (10000, 1, 28, 28)
    assert torch.bincount(labels).tolist()[:3] == [5923, 6742, 5958]  # MNIST's known class counts
    assert len(datamodule.train_dataloader()) == 60000 // 128


def test_default_root_follows_the_environment(monkeypatch):
    monkeypatch.setenv("DIFFUSION_LAB_DATA_DIR", "/somewhere/data")
    assert default_data_root() == "/somewhere/data"
    monkeypatch.delenv("DIFFUSION_LAB_DATA_DIR")
    assert default_data_root() == "data"


def test_missing_mnist_offline_names_folder_files_and_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as raised:
        MNISTDataModule(root=str(tmp_path), download=False).setup()
    message = str(raised.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert (
        "train-images-idx3-ubyte" in message and "data.download=true" in message and "DIFFUSION_LAB_DATA_DIR" in message
    )


def test_fashion_mnist_reads_the_idx_layout(tmp_path):
    write_idx_dataset(tmp_path, "FashionMNIST", train=12, test=5)
    datamodule = FashionMNISTDataModule(root=str(tmp_path), batch_size=4)
    datamodule.setup()
    assert datamodule.splits["train"][0].shape == (12, 1, 28, 28) and datamodule.splits["val"][0].shape == (
        5,
        1,
        28,
        28,
    )


def test_cifar10_reads_torchvisions_pickles_and_flips_only_in_training(tmp_path):
    write_cifar10(tmp_path, train_per_batch=6, test=4)
    datamodule = CIFAR10DataModule(root=str(tmp_path), batch_size=6)
    datamodule.setup()
    train, labels = datamodule.splits["train"]
    assert train.shape == (30, 3, 32, 32) and labels.shape == (30,)
    assert datamodule.splits["val"][0].shape == (4, 3, 32, 32)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as handle:
        first = pickle.load(handle, encoding="bytes")[b"data"][0]
    assert torch.equal(train[0].flatten(), torch.from_numpy(first))

    images = torch.randint(0, 256, (256, 3, 4, 4), dtype=torch.uint8)
    untouched, _ = datamodule.prepare_batch((images, None), training=False)
    flipped, _ = datamodule.prepare_batch((images, None), training=True)
    assert torch.equal(untouched, images.float() / 127.5 - 1)
    was_flipped = (flipped == untouched.flip(-1)).flatten(1).all(1)
    assert 0.3 < was_flipped.float().mean() < 0.7


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(folder / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": Exploit(), b"labels": []}, handle)
    with pytest.raises(pickle.UnpicklingError, match="pathlib"):
        CIFAR10DataModule(root=str(tmp_path)).setup()
    assert not marker.exists()


def test_image_folder_uses_subfolders_as_classes_and_resizes(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=10, size=20)
    datamodule = ImageFolderDataModule(root=str(tmp_path / "imgs"), batch_size=4, image_size=16, num_workers=0)
    datamodule.setup()
    images, labels = datamodule.splits["train"]
    val, _ = datamodule.splits["val"]
    assert images.shape[1:] == (3, 16, 16) and len(images) + len(val) == 20
    assert datamodule.num_classes == 2 and datamodule.class_names == ["cats", "dogs"]
    # Class 1 was drawn brighter: labels must follow the folders.
    assert images[labels == 1].float().mean() > images[labels == 0].float().mean() + 50


def test_image_folder_streams_when_too_large_for_memory(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=6)
    datamodule = ImageFolderDataModule(
        root=str(tmp_path / "imgs"), batch_size=4, image_size=8, in_memory_limit_mb=0.0, num_workers=0, pin_memory=False
    )
    assert datamodule.streaming
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8 and labels.shape == (4,)


def test_an_unreadable_image_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", per_class=3)
    broken = folder / "dogs" / "broken.png"
    broken.write_bytes(b"this is not a png")
    datamodule = ImageFolderDataModule(root=str(folder), batch_size=2, image_size=8, num_workers=0)
    with pytest.raises(UnreadableImageError, match=r"Cannot read image .*broken\.png.*Remove or replace the file"):
        datamodule.setup()


def test_an_empty_or_missing_folder_is_named(tmp_path):
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="Found 0 images under"):
        ImageFolderDataModule(root=str(tmp_path / "empty"))


def test_declared_channels_must_match_the_dataset():
    with pytest.raises(ConfigError, match=r"data\.channels=3 but digits has 1"):
        DigitsDataModule(channels=3)
