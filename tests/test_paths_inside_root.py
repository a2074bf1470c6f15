"""Manifest and dataset paths may not leave the data root, through ``..`` or through a symlink; links that
stay inside the root are fine, and the user may allow outside paths explicitly."""
import os
from pathlib import Path

import pytest

from megaflamingo.io import PathEscapeError, path_inside


@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.wav").write_bytes(b"x")
    (root / "a" / "ok.wav").write_bytes(b"x")
    os.symlink(outside / "secret.wav", root / "a" / "link.wav")
    os.symlink(outside, root / "linked_dir")
    os.symlink(root / "a" / "ok.wav", root / "inner_link.wav")  # stays inside: fine
    os.symlink(root / "a", root / "inner_dir")  # a dataset directory linked from inside the root: fine
    os.symlink(root, tmp_path / "root_alias")  # the root itself may be a symlink
    return root, outside, tmp_path


def test_inside_paths_resolve(tree):
    root, _, tmp = tree
    assert path_inside(root, "a/ok.wav") == root / "a" / "ok.wav"
    assert path_inside(root, "inner_link.wav") == root / "inner_link.wav"
    assert path_inside(root, "inner_dir/ok.wav") == root / "inner_dir" / "ok.wav"
    assert path_inside(tmp / "root_alias", "a/ok.wav") == tmp / "root_alias" / "a" / "ok.wav"
    assert path_inside(root, "a/not_yet_there.wav").name == "not_yet_there.wav"


@pytest.mark.parametrize("rel,reason", [("a/link.wav", "symlink"), ("linked_dir/secret.wav", "symlink"),
                                        ("linked_dir", "symlink"), ("../outside/secret.wav", "parent"),
                                        ("/etc/passwd", "absolute"), ("", "empty")])
def test_escapes_are_refused(tree, rel, reason):
    root, _, _ = tree
    with pytest.raises(PathEscapeError) as e:
        path_inside(root, rel)
    assert e.value.reason == reason


def test_the_user_may_allow_outside_paths(tree):
    root, outside, _ = tree
    assert os.path.realpath(path_inside(root, "a/link.wav", allow_outside=True)) == str((outside / "secret.wav").resolve())
    assert path_inside(root, "/abs/x.wav", allow_outside=True) == Path("/abs/x.wav")


def test_audio_resolver_refuses_a_symlink_leaving_the_root(tree):
    from megaflamingo.audio.decode import AudioError, resolve_in_root

    root, _, _ = tree
    with pytest.raises(AudioError, match="outside") as e:
        resolve_in_root(root, "a/link.wav")
    assert e.value.reason == "outside_data_root"
    assert resolve_in_root(root, "inner_link.wav") == root / "inner_link.wav"


def test_dataset_dir_symlinked_outside_is_refused(tree):
    from megaflamingo.data.reader import DataError, inside_root

    root, _, _ = tree
    with pytest.raises(DataError, match="outside data.data_root.*allow_outside_root"):
        inside_root(root, "linked_dir", False, what="x: dataset directory")
    assert inside_root(root, "inner_dir", False, what="x") == root / "inner_dir"
    assert inside_root(root, "linked_dir", True, what="x") == root / "linked_dir"
