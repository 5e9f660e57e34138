"""The manifest cache of ``peer share`` covers a tree's layout (peerd/app/share.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from peerd.app.share import load_or_build
from peerd.errors import StorageError


def test_a_cached_tree_info_is_reused_only_for_the_same_layout(tmp_path: Path) -> None:
    home = tmp_path / "home"
    top = tmp_path / "top"
    (top / "d").mkdir(parents=True)
    (top / "d" / "f").write_bytes(b"one")
    (top / "g").write_bytes(b"two")
    first, signatures = load_or_build(top, home=home)
    assert first.is_tree and signatures is not None and len(signatures) == 2
    cached = list((home / "manifests").iterdir())
    assert len(cached) == 1
    again, _ = load_or_build(top, home=home)
    assert again == first
    # Same sizes, new bytes and mtime: not the cached info.
    (top / "g").write_bytes(b"TWO")
    stamp = time.time() + 10
    os.utime(top / "g", (stamp, stamp))
    changed, _ = load_or_build(top, home=home)
    assert changed.files == first.files and changed.hashes != first.hashes
    # A new empty directory changes the layout, and so the id.
    (top / "e").mkdir()
    grown, _ = load_or_build(top, home=home)
    assert grown.dirs == ("e",) and grown.content_id != changed.content_id
    # A file of the same path and size under a cache entry of a file: never confused.
    (top / "g").unlink()
    (top / "g").mkdir()
    (top / "g" / "x").write_bytes(b"")
    reshaped, _ = load_or_build(top, home=home)
    assert reshaped.files == (("d/f", 3), ("g/x", 0))


def test_a_tree_with_a_link_is_refused_even_with_a_cache(tmp_path: Path) -> None:
    home = tmp_path / "home"
    top = tmp_path / "top"
    top.mkdir()
    (top / "f").write_bytes(b"x")
    load_or_build(top, home=home)
    (top / "l").symlink_to(top / "f")
    with pytest.raises(StorageError, match="is a symbolic link"):
        load_or_build(top, home=home)
