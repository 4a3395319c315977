"""Held-out split of labelled images (shared by the stepwise transfer and the k-shot evaluation)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.errors import InputError
from ..engine.support import _class_folders


@dataclass
class HeldOutSplit:
    """Which images are held out for evaluation.

    The encoder's own split (``<model>.split.json``, written by the ``train`` command: whole
    scenes held out, about 10 % of every class) when it exists, so
    step 1 never trains on the images the evaluation scores; else whole scenes chosen per class
    folder (about 20 % of every class). Either way crops of one scene never straddle the split.
    """

    held_out: set | None
    source: str
    test_share: float = 0.2
    _computed: dict = field(default_factory=dict, repr=False)
    # The split file's own keys (paths under its data folder, e.g. mars/hirise_landmarks/crater/x.jpg):
    # they still match when the data folder sits somewhere else on this machine.
    relative_keys: set = field(default_factory=set, repr=False)

    @classmethod
    def load(cls, split_file: str | os.PathLike | None = None, model: str | os.PathLike | None = None) -> HeldOutSplit:
        """The split of ``split_file``; else the ``<model>.split.json`` the train command wrote
        beside ``model`` (or beside the shipped model); else the scene hash."""
        from ..engine.encoder import default_model_path

        if split_file:
            candidates = [Path(split_file)]
            if not candidates[0].exists():
                raise InputError(f"The split file '{split_file}' does not exist", "Check the path")
        else:
            shipped = default_model_path()
            candidates = ([Path(model).with_suffix(".split.json")] if model else []) + [
                shipped.with_suffix(".split.json"), shipped.with_name("split.json")]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            return cls(None, "whole scenes, 20 % of every class (datasets.split_by_scene, seed 0; no split.json found)")
        from .datasets import default_data_root

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            # "shared/data" is the project's data folder (datasets.split_record), wherever it is.
            root = default_data_root() if data["data_root"] == "shared/data" else Path(data["data_root"])
            relative = {k.split("#", 1)[0] for k in data["held_out"]}
            keys = {str((root / k).resolve()) for k in relative}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"The split file '{path}' cannot be read: {exc}",
                             "Use the .split.json written by the train command") from exc
        return cls(keys, f"{path} (seed {data.get('seed')}, {len(keys)} held-out images)", relative_keys=relative)

    def is_held_out(self, path: str | os.PathLike, held: set) -> bool:
        """Whether ``path`` is one of ``held`` (:meth:`held_out_of`), or one of the split file's
        images under another data folder (its last path parts equal a key)."""
        resolved = Path(path).resolve()
        if str(resolved) in held:
            return True
        return any("/".join(resolved.parts[-n:]) in self.relative_keys for n in self._key_depths)

    @functools.cached_property
    def _key_depths(self) -> set:
        """Path depths of the split file's keys (asked for every image a split looks at)."""
        return {len(Path(k).parts) for k in self.relative_keys}

    def part_of(self, path: str | os.PathLike) -> str:
        """``"train"`` or ``"test"`` of an image under a split file (see :func:`split_files` otherwise)."""
        if self.held_out is None:
            raise InputError("This split has no list of held-out images", "Use split_files(root, ...)")
        return "test" if self.is_held_out(path, self.held_out) else "train"

    def held_out_of(self, root: str | os.PathLike) -> set:
        """The held-out images under a ``<class>/*`` folder: those of the split file, or else
        whole scenes chosen by the training engineer's :func:`.datasets.split_by_scene` over
        every class folder of ``root`` (seed 0), about ``test_share`` of every class."""
        if self.held_out is not None:
            return self.held_out
        key = str(Path(root).resolve())
        if key not in self._computed:
            from .datasets import ImageRecord, scene_of, split_by_scene

            records = [ImageRecord(str(p.resolve()), f"folder:{c}", scene_of(p), "folder")
                       for c, files in _class_folders(Path(root)) for p in files]
            flags = split_by_scene(records, 0, self.test_share)
            self._computed[key] = {r.path for r, f in zip(records, flags) if f}
        return self._computed[key]


def split_files(root: str | os.PathLike, classes: list[str] | None = None, part: str = "train",
                split: HeldOutSplit | None = None) -> dict[str, list[Path]]:
    """The images of each class folder under ``root`` in the ``train`` or ``test`` part."""
    split = split or HeldOutSplit.load()
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"The labelled data folder '{root}' does not exist", "Check the path")
    found = dict(_class_folders(root))
    names = list(classes) if classes else sorted(found)
    missing = [c for c in names if c not in found]
    if missing:
        raise InputError(f"'{root}' has no class folder(s) {', '.join(missing)}",
                         f"Its classes are: {', '.join(sorted(found))}")
    held = split.held_out_of(root)
    return {c: [p for p in found[c] if split.is_held_out(p, held) == (part == "test")] for c in names}
