"""Image folders: both layouts, the stable hold-out, sharding, class names, and bad files (skipped, never
shifting a label). Every image is filled with a shade that encodes its class, so a shifted label shows."""

import json
import warnings

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from lvm_jax.data import folders, sources

CLASSES = ["cat", "dog", "fox"]


def shade(label: int) -> int:
  return 40 + 60 * label


def write_image(path, label: int, fmt: str = "PNG") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(np.full((8, 6, 3), shade(label), np.uint8)).save(path, fmt)


def make_tree(root, per_class: int, classes=CLASSES, start: int = 0) -> None:
  for label, name in enumerate(classes):
    for i in range(start, start + per_class):
      fmt, ext = (("JPEG", "jpg"), ("PNG", "png"), ("JPEG", "JPEG"))[i % 3]
      write_image(root / name / f"{name}_{i:03d}.{ext}", label, fmt)


def read(source, process_index=0, process_count=1):
  """[(file content shade, label)] in the order the source yields them."""
  out = []
  for ex in source.dataset(process_index, process_count).as_numpy_iterator():
    image = tf.io.decode_image(ex["image"], channels=3).numpy()
    out.append((int(round(image.mean())), int(ex["label"])))
  return out


def assert_labels_match_content(pairs):
  assert pairs and all(abs(value - shade(label)) <= 2 for value, label in pairs), pairs


@pytest.fixture
def split_tree(tmp_path):
  make_tree(tmp_path / "train", 7)
  make_tree(tmp_path / "val", 2, start=100)
  return tmp_path


def test_split_layout(split_tree):
  train = sources.make_source("folder", root=str(split_tree), split="train")
  val = sources.make_source("folder", root=str(split_tree), split="val")
  assert train.layout == "splits" and train.class_names == val.class_names == CLASSES
  assert (train.num_examples, val.num_examples) == (21, 6)
  assert train.files == sorted(train.files) and train.files[0] == "train/cat/cat_000.jpg"
  pairs = read(train)
  assert_labels_match_content(pairs)
  assert [label for _, label in pairs] == [0] * 7 + [1] * 7 + [2] * 7
  assert_labels_match_content(read(val))
  assert train.dataset().element_spec == {"image": tf.TensorSpec([], tf.string), "label": tf.TensorSpec([], tf.int64)}


@pytest.mark.parametrize("count", [1, 2, 4, 30])
def test_shards_are_strided_disjoint_complete(split_tree, count):
  source = folders.FolderSource(str(split_tree), "train")
  whole = [ex["image"] for ex in source.dataset().as_numpy_iterator()]
  shards = [[ex["image"] for ex in source.dataset(i, count).as_numpy_iterator()] for i in range(count)]
  assert [len(s) for s in shards] == [source.shard_size(i, count) for i in range(count)]
  assert sum(map(len, shards)) == len(whole) == 21
  for i, shard in enumerate(shards):
    assert shard == whole[i::count]
  assert shards == [[ex["image"] for ex in source.dataset(i, count).as_numpy_iterator()] for i in range(count)]


def test_class_layout_holdout_is_stable_when_files_are_added(tmp_path):
  make_tree(tmp_path, 40)
  train = folders.FolderSource(str(tmp_path), "train", holdout_fraction=0.25)
  held = folders.FolderSource(str(tmp_path), "validation", holdout_fraction=0.25)
  assert train.layout == "classes" and train.class_names == CLASSES
  assert not set(train.files) & set(held.files)
  assert sorted(train.files + held.files) == sorted(f"{c}/{c}_{i:03d}.{('jpg', 'png', 'JPEG')[i % 3]}"
                                                    for c in CLASSES for i in range(40))
  assert 15 <= held.num_examples <= 45  # 25% of 120, give or take the hash
  assert all(folders.holdout_score(f) < 0.25 for f in held.files)
  assert_labels_match_content(read(train))
  assert_labels_match_content(read(held))
  make_tree(tmp_path, 40, start=40)  # twice as many files: none of the old ones may change sides
  train2 = folders.FolderSource(str(tmp_path), "train", holdout_fraction=0.25)
  held2 = folders.FolderSource(str(tmp_path), "validation", holdout_fraction=0.25)
  assert set(train.files) <= set(train2.files) and set(held.files) <= set(held2.files)
  assert train2.num_examples + held2.num_examples == 240


def test_holdout_score_is_pinned():
  # A fixed function of the path (SHA-256), not Python's per-process hash(): the same on every machine and run.
  assert folders.holdout_score("cat/cat_000.jpg") == pytest.approx(0.023735, abs=1e-6)
  assert folders.holdout_score("cat/cat_000.jpg") != folders.holdout_score("dog/cat_000.jpg")


def test_custom_split_names(tmp_path):
  make_tree(tmp_path, 10)
  test = folders.FolderSource(str(tmp_path), "test", holdout_split="test", holdout_fraction=0.3)
  default = folders.FolderSource(str(tmp_path), "validation", holdout_fraction=0.3)
  assert test.files == default.files
  with pytest.raises(ValueError, match="its splits are 'train' and 'test'.*not 'validation'"):
    folders.FolderSource(str(tmp_path), "validation", holdout_split="test")
  with pytest.raises(ValueError, match="holdout_fraction must be in \\(0, 1\\), got 1.5"):
    folders.FolderSource(str(tmp_path), "train", holdout_fraction=1.5)


def test_class_names_json(split_tree, tmp_path):
  source = folders.FolderSource(str(split_tree), "train")
  path = tmp_path / "classes.json"
  source.save_class_names(str(path))
  assert json.loads(path.read_text()) == CLASSES
  assert sources.load_class_names(str(path)) == CLASSES


def write_bad_files(class_dir) -> None:
  good = class_dir / "zz_good.jpg"
  write_image(good, 0, "JPEG")
  data = (class_dir / "zz_good.jpg").read_bytes()
  PIL.Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(
      class_dir / "truncated.jpg", "JPEG")
  (class_dir / "truncated.jpg").write_bytes((class_dir / "truncated.jpg").read_bytes()[:600])
  (class_dir / "noise.jpg").write_bytes(np.random.RandomState(1).bytes(len(data)))
  (class_dir / "notes.txt").write_text("not an image")
  (class_dir / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored, not counted
  good.unlink()


def test_bad_files_are_skipped_with_a_warning_and_labels_hold(split_tree):
  write_bad_files(split_tree / "train" / "dog")
  with pytest.warns(UserWarning) as record:
    source = folders.FolderSource(str(split_tree), "train")
  message = str(record[0].message)
  assert message.startswith("Skipped 3 of 24 files in")
  for name in ("dog/truncated.jpg", "dog/noise.jpg", "dog/notes.txt (not a .jpg/.jpeg/.png file)"):
    assert name in message
  assert sorted(f for f, _ in source.skipped) == ["train/dog/noise.jpg", "train/dog/notes.txt",
                                                   "train/dog/truncated.jpg"]
  assert source.num_examples == 21
  pairs = read(source)
  assert_labels_match_content(pairs)
  assert [label for _, label in pairs] == [0] * 7 + [1] * 7 + [2] * 7


def test_strict_fails_naming_the_files(split_tree):
  write_bad_files(split_tree / "train" / "fox")
  with pytest.raises(ValueError, match=r"3 of 24 files .*fox/noise.jpg.*strict=True"):
    folders.FolderSource(str(split_tree), "train", strict=True)


def test_index_caches_verdicts_and_notices_changes(split_tree, tmp_path, monkeypatch):
  index = tmp_path / "index.json"
  write_bad_files(split_tree / "train" / "cat")
  with pytest.warns(UserWarning, match="Skipped 3 of 24"):
    first = folders.FolderSource(str(split_tree), "train", index_path=str(index))
  saved = json.loads(index.read_text())
  assert saved["root"] == str(split_tree) and len(saved["files"]) == 23  # notes.txt is never decoded
  decoded = []
  real = folders._decode_failures
  monkeypatch.setattr(folders, "_decode_failures", lambda paths: decoded.extend(paths) or real(paths))
  with pytest.warns(UserWarning, match="Skipped 3 of 24"):
    again = folders.FolderSource(str(split_tree), "train", index_path=str(index))
  assert decoded == [] and again.files == first.files
  victim = split_tree / "train" / "dog" / "dog_001.png"
  victim.write_bytes(victim.read_bytes()[:30])  # changed size: decoded again, and now skipped
  with pytest.warns(UserWarning, match="Skipped 4 of 24.*dog_001.png"):
    folders.FolderSource(str(split_tree), "train", index_path=str(index))
  assert decoded == [str(victim)]


def test_empty_class_folder(split_tree):
  (split_tree / "val" / "dog").mkdir(exist_ok=True)
  for f in (split_tree / "val" / "dog").iterdir():
    f.unlink()
  with pytest.raises(ValueError, match=r"Class folder .*val/dog is empty"):
    folders.FolderSource(str(split_tree), "val")
  (split_tree / "flat" / "owl").mkdir(parents=True)
  write_image(split_tree / "flat" / "cat" / "a.png", 0)
  with pytest.raises(ValueError, match=r"Class folder .*flat/owl is empty"):
    folders.FolderSource(str(split_tree / "flat"), "train")


def test_class_in_one_split_only(split_tree):
  write_image(split_tree / "train" / "owl" / "a.png", 3)
  with pytest.raises(ValueError, match=r"Class 'owl' is in train but missing from .*val"):
    folders.FolderSource(str(split_tree), "train")


def test_root_and_split_errors(tmp_path_factory, split_tree):
  elsewhere = tmp_path_factory.mktemp("roots")
  with pytest.raises(FileNotFoundError, match=r"root .*nowhere does not exist"):
    folders.FolderSource(str(elsewhere / "nowhere"), "train")
  (elsewhere / "empty").mkdir()
  with pytest.raises(ValueError, match=r"root .*empty contains no folders"):
    folders.FolderSource(str(elsewhere / "empty"), "train")
  with pytest.raises(ValueError, match=r"has split folders train, val; there is no split 'validation'"):
    folders.FolderSource(str(split_tree), "validation")
  with pytest.raises(ValueError, match="layout must be one of"):
    folders.FolderSource(str(split_tree), "train", layout="flat")
  with pytest.raises(TypeError, match="unknown argument\\(s\\) stict. Did you mean strict"):
    sources.make_source("folder", root=str(split_tree), split="train", stict=True)


def test_all_files_bad_is_an_error(tmp_path):
  (tmp_path / "cat").mkdir()
  (tmp_path / "cat" / "a.jpg").write_bytes(b"nope")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ValueError, match="has no readable images"):
      folders.FolderSource(str(tmp_path), "train", holdout_fraction=0.01)
