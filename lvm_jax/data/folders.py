"""Your own images as a source: root/<split>/<class>/*.jpg|jpeg|png, or root/<class>/* with a held-out fraction.

Labels come from the class folder names, sorted: class_names[i] is label i (save_class_names writes them as
JSON). Files are found recursively inside each class folder, so a class may keep its images in subfolders
(root/<class>/<sub>/*.jpg); layout="auto" tells that tree from root/<split>/<class>/ only when the folders are
named like splits (train, val, test, ...) or one is the split asked for, and otherwise asks for a layout rather
than guess. Where root has no split folders, a file is held out when a stable hash of its path relative to root
(SHA-256 of "<class>/<name>") falls below holdout_fraction: adding or removing files never moves another file
between the splits. Process i of n reads files i::n of the split's sorted list.

Every file is decoded once, up front, by TensorFlow's own decoder (the one the pipeline uses), so a corrupt,
truncated or non-image file is found before training and never shifts a label: it is skipped with a warning
naming it (or is an error with strict=True). A class left with no readable image is an error all the same: its
label would never be trained or evaluated. Without split folders that means no readable file anywhere under
root/<class>; a small class whose readable files the hash all puts in the other split only gets a warning.
Validation runs in parallel in tf.data; with index_path the verdicts are kept in a small JSON file keyed by
path, size and mtime, so only new or changed files are decoded again.
"""

import hashlib
import json
import os
import posixpath
import re
import warnings
from typing import Optional

import numpy as np

from lvm_jax.data import sources
from lvm_jax.tf_host import tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUTS = ("auto", "splits", "classes")
_INDEX_VERSION = 1
_LISTED_IN_WARNING = 20
_LISTED_IN_ERROR = 3
# Folder names that say "split" (COCO's val2017 too). Folders holding only folders are read as splits when they
# are all named so, or one is the split asked for; otherwise they may be classes with subfolders, and auto asks.
_SPLIT_NAME = re.compile(
  r"(train|training|trainval|val|valid|validation|test|testing|eval|evaluation|dev|"
  r"holdout|minival)[-_]?\d*",
  re.IGNORECASE,
)
_CHOOSE_LAYOUT = (
  "set layout='classes' (in a recipe, data.train.layout and data.eval.layout: --config.data.train.layout=classes)"
)


class FolderSource(sources.Source):
  """One split of an image folder tree.

  root: a local or gs:// directory. split: a split folder's name (root/<split>/<class>/...), or, without split
    folders, `train_split` or `holdout_split`. holdout_fraction: the share of each class held out (no split
    folders only). layout: "splits" or "classes" to say which tree root is; "auto" tells them apart (split
    folders contain only folders and are named like splits, or one is `split`; class folders contain image
    files; anything else is an error asking for a layout). strict: an unreadable file is an error rather than
    skipped. index_path: a JSON file caching which files decode, reused across runs.

  Raises ValueError when a class has no readable image (strict or not): in the split's class folder with split
  folders, anywhere under root/<class> without (replace the bad files or remove the class folder). A class
  whose readable files all fall in the other split of the hold-out is a warning, not an error.
  """

  def __init__(
    self,
    root: str,
    split: str = "train",
    *,
    holdout_fraction: float = 0.1,
    holdout_split: str = "validation",
    train_split: str = "train",
    layout: str = "auto",
    strict: bool = False,
    index_path: Optional[str] = None,
  ):
    root = os.fspath(root)
    if not tf.io.gfile.isdir(root):
      what = "is not a directory" if tf.io.gfile.exists(root) else "does not exist"
      raise FileNotFoundError(
        f"Image folder root {root} {what}; expected root/<split>/<class>/*.jpg or root/<class>/*.jpg."
      )
    if layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    self.root, self.split = root, split
    top = _subdirs(root)
    if not top:
      raise ValueError(
        f"Image folder root {root} contains no folders; expected root/<split>/<class>/*.jpg or root/<class>/*.jpg."
      )
    if layout == "auto":
      layout = _auto_layout(root, top, split)
    self.layout = layout
    if layout == "splits":
      self.class_names, candidates, labels = _split_tree(root, top, split)
    else:
      self.class_names, candidates, labels = _class_tree(root, top, split, train_split, holdout_split, holdout_fraction)
    self.skipped = _validate(root, candidates, strict, index_path)  # [(relative path, why)], kept for callers
    bad = dict(self.skipped)
    kept = [(path, label) for path, label in zip(candidates, labels) if path not in bad]
    # Sorted by path, so the order (and so each process's shard) depends on nothing but the file names.
    kept.sort()
    self.files = [path for path, _ in kept]
    self.labels = np.array([label for _, label in kept], np.int64)
    self.num_examples = len(self.files)
    counts = np.bincount(self.labels, minlength=len(self.class_names))
    absent = [name for name, count in zip(self.class_names, counts) if not count]
    if absent and layout == "splits":
      _no_readable_image(root, split, [_join(split, name).replace(os.sep, "/") for name in absent], bad)
    elif absent:
      _check_holdout_classes(root, split, holdout_fraction, absent, set(candidates), bad, index_path)
    if not self.num_examples:
      raise ValueError(f"Split {split!r} of {root} has no readable images.")

  def shard_size(self, process_index: int = 0, process_count: int = 1) -> int:
    sources.check_shard(process_index, process_count)
    return len(range(process_index, self.num_examples, process_count))

  def dataset(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    return self.references(process_index, process_count).map(
      self.load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )

  def references(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """{"path", "label"} of this shard's files: a shuffle buffer of paths costs bytes per example rather than
    the encoded image, fills at once at each epoch's start, and a resume skips examples without reading them."""
    sources.check_shard(process_index, process_count)
    paths = [_join(self.root, f) for f in self.files[process_index::process_count]]
    labels = self.labels[process_index::process_count]
    return tf.data.Dataset.from_tensor_slices(
      {"path": tf.constant(paths, tf.string), "label": tf.constant(labels, tf.int64)}
    )

  @staticmethod
  def load(reference: dict) -> dict:
    """A reference with its file's bytes as "image" in place of "path" (other keys, such as rng, kept)."""
    example = {k: v for k, v in reference.items() if k != "path"}
    return {**example, "image": tf.io.read_file(reference["path"])}


def _join(*parts: str) -> str:
  return posixpath.join(*parts) if parts[0].startswith("gs://") else os.path.join(*parts)


def _hidden(name: str) -> bool:
  return name.startswith(".")  # .DS_Store, ._resource forks, .ipynb_checkpoints: never data


def _subdirs(path: str) -> list[str]:
  return sorted(
    n.rstrip("/") for n in tf.io.gfile.listdir(path) if not _hidden(n) and tf.io.gfile.isdir(_join(path, n.rstrip("/")))
  )


def _only_folders(path: str) -> bool:
  """Whether `path` holds folders and no files; stops at the first file, so a class folder of a million images
  costs one listing, not a million stat calls."""
  names = [n for n in tf.io.gfile.listdir(path) if not _hidden(n)]
  return bool(names) and all(n.endswith("/") or tf.io.gfile.isdir(_join(path, n)) for n in names)


def _auto_layout(root: str, top: list[str], split: str) -> str:
  if not all(_only_folders(_join(root, d)) for d in top):
    return "classes"
  if split in top or all(_SPLIT_NAME.fullmatch(d) for d in top):
    return "splits"
  subs = _subdirs(_join(root, top[0]))
  example = _join(root, top[0], subs[0]) if subs else _join(root, top[0])
  raise ValueError(
    f"layout='auto' cannot tell what the folders of {root} are: {', '.join(top[:5])}"
    f"{', ...' if len(top) > 5 else ''} hold only folders (such as {example}), none is named like a split "
    f"and none is {split!r}. If {_join(root, '<x>')} are classes whose images sit in subfolders, "
    f"{_CHOOSE_LAYOUT}; if they are split folders (root/<split>/<class>/), set layout='splits' and ask for one "
    "of them as the split."
  )


def _class_files(root: str, class_dir: str) -> list[str]:
  """Every non-hidden file under root/class_dir, as paths relative to root ("/"-separated), sorted."""
  found = []
  for directory, dirs, names in tf.io.gfile.walk(_join(root, class_dir)):
    dirs[:] = [d for d in dirs if not _hidden(d.rstrip("/"))]
    relative = (
      os.path.relpath(directory, root).replace(os.sep, "/")
      if not root.startswith("gs://")
      else directory[len(root.rstrip("/")) + 1 :]
    )
    found.extend(f"{relative}/{n}" for n in names if not _hidden(n))
  return sorted(found)


def _split_tree(root: str, splits: list[str], split: str):
  if split not in splits:
    raise ValueError(
      f"{root} has split folders {', '.join(splits)}; there is no split {split!r}. (If those "
      f"folders are classes whose images sit in subfolders, {_CHOOSE_LAYOUT}.)"
    )
  classes = {s: set(_subdirs(_join(root, s))) for s in splits}
  every = set().union(*classes.values())
  for name in sorted(every):
    missing = [s for s in splits if name not in classes[s]]
    if missing:
      raise ValueError(
        f"Class {name!r} is in {', '.join(s for s in splits if s not in missing)} but missing from "
        f"{', '.join(_join(root, s) for s in missing)}: every split folder needs the same class "
        "folders, or labels would mean different classes in different splits."
      )
  if not every:
    raise ValueError(f"The split folders of {root} ({', '.join(splits)}) contain no class folders.")
  class_names = sorted(every)
  split_root = _join(root, split)
  files, labels = [], []
  for label, name in enumerate(class_names):
    found = _class_files(root, _join(split, name).replace(os.sep, "/"))
    if not found:
      raise ValueError(f"Class folder {_join(split_root, name)} is empty.")
    files += found
    labels += [label] * len(found)
  return class_names, files, labels


def holdout_score(relative_path: str) -> float:
  """A stable number in [0, 1) for a path relative to root: the file is held out when it is < the fraction."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


def _class_tree(
  root: str, class_names: list[str], split: str, train_split: str, holdout_split: str, holdout_fraction: float
):
  if split not in (train_split, holdout_split):
    raise ValueError(
      f"{root} has no split folders (its folders are classes), so its splits are "
      f"{train_split!r} and {holdout_split!r} (train_split / holdout_split), not {split!r}."
    )
  if train_split == holdout_split:
    raise ValueError(f"train_split and holdout_split are both {train_split!r}.")
  if not 0 < holdout_fraction < 1:
    raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}.")
  held_out = split == holdout_split
  files, labels, total = [], [], 0
  for label, name in enumerate(class_names):
    found = _class_files(root, name)
    if not found:
      raise ValueError(f"Class folder {_join(root, name)} is empty.")
    chosen = [f for f in found if (holdout_score(f) < holdout_fraction) == held_out]
    files += chosen
    labels += [label] * len(chosen)
    total += len(found)
  if not files:
    raise ValueError(
      f"None of the {total} files under {root} falls in split {split!r}: the hash at "
      f"holdout_fraction={holdout_fraction} puts them all in the other split (too few files). Add "
      "images, change holdout_fraction, or make split folders (root/<split>/<class>/)."
    )
  return class_names, files, labels


def _no_readable_image(root: str, split: str, class_dirs: list[str], bad: dict[str, str]) -> None:
  """Raises for classes none of whose files decodes (`class_dirs` relative to root, `bad` maps file -> why)."""
  names, lines = [], []
  for class_dir in class_dirs:
    names.append(repr(class_dir.rsplit("/", 1)[-1]))
    failed = [(f, why) for f, why in sorted(bad.items()) if f.startswith(class_dir + "/")]
    examples = "; ".join(f"{f.rsplit('/', 1)[-1]}: {why}" for f, why in failed[:_LISTED_IN_ERROR])
    lines.append(
      f"{_join(root, class_dir)}: {len(failed)} file(s), none readable ({examples}"
      f"{'; ...' if len(failed) > _LISTED_IN_ERROR else ''})"
    )
  what = f"class {names[0]} has" if len(names) == 1 else f"classes {', '.join(names)} have"
  folders = "from every split folder" if "/" in class_dirs[0] else "from root"
  raise ValueError(
    f"Reading split {split!r} of {root}: {what} no readable images, so a label would never be seen (skipping bad "
    f"files, strict=False, never drops a whole class). {'; '.join(lines)}. Replace the bad files with images, "
    f"or remove the class folder {folders}."
  )


def _check_holdout_classes(
  root: str,
  split: str,
  holdout_fraction: float,
  absent: list[str],
  candidates: set[str],
  bad: dict[str, str],
  index_path: Optional[str],
) -> None:
  """Classes with no readable example in this side of the hold-out: an error when the class has no readable file
  in either side; a warning when the hash put all its readable files in the other split (a small class)."""
  unreadable, elsewhere = [], []
  for name in absent:
    others = [f for f in _class_files(root, name) if f not in candidates]  # the other split's share
    others_bad = _verdicts(root, others, index_path)
    if len(others_bad) == len(others):
      unreadable.append(name)
      bad = {**bad, **others_bad}
    else:
      elsewhere.append(f"{name!r} ({len(others) - len(others_bad)} readable file(s))")
  if unreadable:
    _no_readable_image(root, split, unreadable, bad)
  warnings.warn(
    f"Split {split!r} of {root} has no example of class(es) {', '.join(elsewhere)}: the hash at "
    f"holdout_fraction={holdout_fraction} puts all their readable files in the other split. "
    "Add images to them, change holdout_fraction, or make split folders (root/<split>/<class>/).",
    stacklevel=3,
  )


def _decode_failures(paths: list[str]) -> set[int]:
  """Indices of the files that TensorFlow's decoder rejects, found in one parallel pass."""
  if not paths:
    return set()
  table = tf.constant(paths, tf.string)

  def decode(i):
    image = tf.io.decode_image(tf.io.read_file(table[i]), channels=3, expand_animations=False)
    return i, tf.shape(image)

  ds = tf.data.Dataset.range(len(paths)).map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ok = {int(i) for i, _ in ds.ignore_errors().as_numpy_iterator()}
  return set(range(len(paths))) - ok


def _decode_error(path: str) -> str:
  """Why one file does not decode, in one line (only asked of the few files that failed)."""
  try:
    tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    return e.message.strip().splitlines()[-1].split("}}")[-1].strip() or type(e).__name__
  return "failed to decode"


def _load_index(index_path: Optional[str], root: str) -> dict:
  if not index_path or not tf.io.gfile.exists(index_path):
    return {}
  try:
    with tf.io.gfile.GFile(index_path) as f:
      index = json.load(f)
  except (ValueError, tf.errors.OpError):
    warnings.warn(f"Ignoring the unreadable validation index {index_path}; it will be rewritten.")
    return {}
  if index.get("version") != _INDEX_VERSION or index.get("root") != root:
    return {}  # another format or another tree: trust nothing in it
  return index.get("files", {})


def _verdicts(root: str, files: list[str], index_path: Optional[str]) -> dict[str, str]:
  """{file: why} for the files that are not images the pipeline can decode."""
  bad = {f: f"not a {'/'.join(IMAGE_EXTENSIONS)} file" for f in files if not f.lower().endswith(IMAGE_EXTENSIONS)}
  images = [f for f in files if f not in bad]
  index = _load_index(index_path, root)
  stamps = {}
  if index_path:
    for f in images:
      stat = tf.io.gfile.stat(_join(root, f))
      stamps[f] = [stat.length, stat.mtime_nsec]
  known = {f: index[f][2] for f in images if f in index and index[f][:2] == stamps.get(f)}
  unknown = [f for f in images if f not in known]
  failed = {unknown[i] for i in _decode_failures([_join(root, f) for f in unknown])}
  for f in unknown:
    known[f] = _decode_error(_join(root, f)) if f in failed else None
  bad.update({f: why for f, why in known.items() if why is not None})
  if index_path and unknown:
    entries = {**index, **{f: stamps[f] + [known[f]] for f in images}}
    with tf.io.gfile.GFile(index_path, "w") as out:
      json.dump({"version": _INDEX_VERSION, "root": root, "files": entries}, out)
  return bad


def _validate(root: str, files: list[str], strict: bool, index_path: Optional[str]) -> list[tuple[str, str]]:
  """[(file, why)] for the files that are not images the pipeline can decode, warned about (or an error)."""
  skipped = sorted(_verdicts(root, files, index_path).items())
  if skipped:
    listed = "; ".join(f"{_join(root, f)} ({why})" for f, why in skipped[:_LISTED_IN_WARNING])
    more = f"; and {len(skipped) - _LISTED_IN_WARNING} more" if len(skipped) > _LISTED_IN_WARNING else ""
    summary = f"{len(skipped)} of {len(files)} files in {root} are not readable images: {listed}{more}."
    if strict:
      raise ValueError(f"{summary} (strict=True; remove them, or pass strict=False to skip them.)")
    warnings.warn(f"Skipped {summary}", stacklevel=3)
  return skipped
