"""Packed shards: the same (bytes, label) per index as the image folder, the same training, a
corrupt shard named in one sentence."""

import pytest
import torch

from conadv.config import DataConfig
from conadv.data.loader import build_source
from conadv.data.shards import ShardSource, pack_image_folder
from conadv.errors import DataError
from conadv.train.job import train
from tests.helpers import checkpoint_state, jpeg_folder, run_module, tiny_config


def _packed(tmp_path, shard_bytes=6000):
    jpeg_folder(tmp_path / "folder", classes=3, per_class=7)
    pack_image_folder(tmp_path / "folder", tmp_path / "shards", shard_bytes)
    return tmp_path / "folder", tmp_path / "shards"


def test_every_index_has_the_folders_bytes_and_label(tmp_path):
    folder, shards = _packed(tmp_path)
    for split in ("train", "val"):
        by_folder = build_source(DataConfig(name="imagefolder", root=str(folder)), split)
        by_shards = build_source(DataConfig(name="shards", root=str(shards)), split)
        assert isinstance(by_shards, ShardSource) and len(by_shards.shards) > 1
        assert len(by_shards) == len(by_folder) == 21 and by_shards.classes == by_folder.classes
        for i in range(len(by_folder)):
            with open(by_folder.describe(i), "rb") as handle:
                assert by_shards.read_bytes(i) == handle.read(), i
            assert by_shards.label(i) == by_folder.label(i)
            assert torch.equal(by_shards.load(i), by_folder.load(i))


def test_training_on_shards_equals_training_on_the_folder(tmp_path):
    folder, shards = _packed(tmp_path)
    run = ["data.image_size=24", "data.eval_resize=28", "train.global_batch=6",
           "train.max_steps=4", "data.augment=autoaugment"]
    a = train(tiny_config(tmp_path / "a", "data.name=imagefolder", f"data.root={folder}", *run))
    b = train(tiny_config(tmp_path / "b", "data.name=shards", f"data.root={shards}", *run))
    assert a["final_eval"] == b["final_eval"]
    sa, sb = checkpoint_state(tmp_path / "a"), checkpoint_state(tmp_path / "b")
    assert all(torch.equal(v, sb["model"][k]) for k, v in sa["model"].items())


def test_a_corrupt_or_missing_shard_is_one_sentence(tmp_path):
    _, shards = _packed(tmp_path)
    shard = shards / "train-00001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    source = ShardSource(shards, "train")
    with pytest.raises(DataError, match=f"shard {shard} is corrupt: 1000 bytes"):
        [source.load(i) for i in range(len(source))]
    shard.unlink()
    with pytest.raises(DataError, match=f"shard {shard} is missing"):
        [ShardSource(shards, "train").load(i) for i in range(21)]
    with pytest.raises(DataError, match="pack the image folder first"):
        ShardSource(tmp_path / "nowhere", "train")


def test_a_flipped_byte_inside_a_shard_is_an_unreadable_image_not_garbage(tmp_path):
    """The shard keeps its size, so only the sample's CRC-32 can tell; with bad_images=skip the
    sample is replaced and counted like any unreadable file."""
    _, shards = _packed(tmp_path)
    source = ShardSource(shards, "train")
    shard, offset, size = source.samples[5][:3]
    path = shards / source.shards[shard]["name"]
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sample 5 does not match its checksum"):
        ShardSource(shards, "train").read_bytes(5)
    assert ShardSource(shards, "train").read_bytes(4)  # its neighbours are fine
    summary = train(tiny_config(tmp_path / "run", "data.name=shards", f"data.root={shards}",
                                "data.image_size=24", "data.eval_resize=28",
                                "train.global_batch=7", "data.bad_images=skip",
                                "train.max_steps=3"))
    assert summary["bad_images"] == 1


def test_pack_refuses_an_image_that_does_not_decode_and_can_run_again(tmp_path):
    bad = jpeg_folder(tmp_path / "folder", corrupt=True)
    result = run_module("conadv.cli.pack", str(tmp_path / "folder"), str(tmp_path / "shards"))
    assert result.returncode == 2
    assert f"cannot pack {bad}: it does not decode" in result.stderr
    bad.unlink()
    again = run_module("conadv.cli.pack", str(tmp_path / "folder"), str(tmp_path / "shards"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "train: 11 images in 1 shards" in again.stdout
    assert not list((tmp_path / "shards").glob("*.tmp"))
