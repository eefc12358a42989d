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
  assert sorted(train.files + held.files) == sorted(
    f"{c}/{c}_{i:03d}.{('jpg', 'png', 'JPEG')[i % 3]}" for c in CLASSES for i in range(40)
  )
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
    class_dir / "truncated.jpg", "JPEG"
  )
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
  assert sorted(f for f, _ in source.skipped) == [
    "train/dog/noise.jpg",
    "train/dog/notes.txt",
    "train/dog/truncated.jpg",
  ]
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
    with pytest.raises(ValueError, match="class 'cat' has no readable images"):
      folders.FolderSource(str(tmp_path), "train", holdout_fraction=0.01)


# ------------------------------------------------------------ a class with no readable image (strict=False too)


def spoil(class_dir, count: int = 3) -> None:
  """Replaces the class folder's files with `count` files that do not decode."""
  for f in class_dir.iterdir():
    f.unlink()
  for i in range(count):
    (class_dir / f"bad_{i}.jpg").write_bytes(b"not a jpeg")


def test_split_layout_class_with_no_readable_image_is_an_error(split_tree):
  spoil(split_tree / "train" / "fox")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the skipped-files warning; the error is what matters
    with pytest.raises(ValueError, match=r"split 'train' .*class 'fox' has no readable images.*train/fox: 3 file"):
      folders.FolderSource(str(split_tree), "train")
  assert folders.FolderSource(str(split_tree), "val").num_examples == 6  # val/fox is fine


def test_class_layout_class_with_no_readable_image_is_an_error_in_both_splits(tmp_path):
  make_tree(tmp_path, 12)
  spoil(tmp_path / "fox", 12)
  for split in ("train", "validation"):  # whether or not any of fox's files is held out
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with pytest.raises(ValueError, match=rf"split '{split}' .*class 'fox' has no readable images.*/fox: 12 file"):
        folders.FolderSource(str(tmp_path), split, holdout_fraction=0.25)


def name_scoring(prefix: str, keep) -> str:
  """The first "<prefix>_<i>.png" whose hold-out score satisfies `keep`."""
  return next(f"{prefix}_{i}.png" for i in range(1000) if keep(folders.holdout_score(f"{prefix}_{i}.png")))


def test_small_class_with_nothing_held_out_is_a_warning_not_an_error(tmp_path):
  make_tree(tmp_path, 12)
  only = name_scoring("owl/owl", lambda score: score >= 0.25)  # the hash keeps it in train
  write_image(tmp_path / only, 3)
  with pytest.warns(UserWarning, match=r"Split 'validation' .*no example of class\(es\) 'owl' \(1 readable"):
    held = folders.FolderSource(str(tmp_path), "validation", holdout_fraction=0.25)
  assert held.class_names == CLASSES + ["owl"] and 3 not in held.labels
  train = folders.FolderSource(str(tmp_path), "train", holdout_fraction=0.25)
  assert train.files.count(only) == 1


def test_held_out_files_unreadable_but_train_files_fine_is_a_warning(tmp_path):
  make_tree(tmp_path, 12)
  good = name_scoring("owl/owl", lambda score: score >= 0.25)
  bad = name_scoring("owl/bad", lambda score: score < 0.25)
  write_image(tmp_path / good, 3)
  (tmp_path / bad).write_bytes(b"broken")
  with pytest.warns(UserWarning) as record:
    folders.FolderSource(str(tmp_path), "validation", holdout_fraction=0.25)
  messages = " ".join(str(r.message) for r in record)
  assert bad in messages and "no example of class(es) 'owl'" in messages


def test_no_file_held_out_at_all_is_an_error(tmp_path):
  write_image(tmp_path / name_scoring("cat/a", lambda score: score >= 0.1), 0)
  with pytest.raises(ValueError, match=r"None of the 1 files .*falls in split 'validation'.*holdout_fraction=0.1"):
    folders.FolderSource(str(tmp_path), "validation")


# --------------------------------------------------------------------- class folders holding subfolders


def make_nested_tree(root) -> None:
  """root/<class>/<sub>/*.png: classes whose images sit in subfolders."""
  for label, name in enumerate(CLASSES):
    for sub in ("indoor", "outdoor"):
      for i in range(6):
        write_image(root / name / sub / f"{i}.png", label)


def test_layout_classes_reads_class_folders_with_subfolders(tmp_path):
  make_nested_tree(tmp_path)
  train = folders.FolderSource(str(tmp_path), "train", layout="classes", holdout_fraction=0.25)
  held = folders.FolderSource(str(tmp_path), "validation", layout="classes", holdout_fraction=0.25)
  assert train.layout == "classes" and train.class_names == held.class_names == CLASSES
  assert train.num_examples + held.num_examples == 36 and "cat/indoor/0.png" in train.files + held.files
  assert_labels_match_content(read(train))
  assert_labels_match_content(read(held))


@pytest.mark.parametrize("split", ["train", "validation"])
def test_auto_on_class_folders_with_subfolders_asks_for_a_layout(tmp_path, split):
  make_nested_tree(tmp_path)
  with pytest.raises(
    ValueError,
    match=r"layout='auto' cannot tell.*cat/indoor.*"
    r"set layout='classes'.*--config.data.train.layout=classes",
  ):
    folders.FolderSource(str(tmp_path), split)
  with pytest.raises(ValueError, match=r"no split 'train'.*set layout='classes'"):
    folders.FolderSource(str(tmp_path), "train", layout="splits")


@pytest.mark.parametrize("names,split", [(("train2017", "val2017"), "val2017"), (("trn", "tst"), "tst")])
def test_auto_reads_split_folders_named_like_splits_or_asked_for(tmp_path, names, split):
  for name in names:
    make_tree(tmp_path / name, 2)
  source = folders.FolderSource(str(tmp_path), split)
  assert source.layout == "splits" and source.class_names == CLASSES and source.num_examples == 6
