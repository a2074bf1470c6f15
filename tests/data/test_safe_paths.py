"""Manifest and dataset paths may not leave the data root, through ``..`` or through a symlink."""
import os

import pytest

from megaflamingo.safe_paths import PathEscapeError, resolve_inside


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
    os.symlink(root, tmp_path / "root_alias")  # the root itself may be a symlink
    return root, outside, tmp_path


def test_inside_paths_resolve(tree):
    root, _, tmp = tree
    assert resolve_inside(root, "a/ok.wav") == (root / "a" / "ok.wav").resolve()
    assert resolve_inside(root, "inner_link.wav") == (root / "a" / "ok.wav").resolve()
    assert resolve_inside(tmp / "root_alias", "a/ok.wav") == (root / "a" / "ok.wav").resolve()
    assert resolve_inside(root, "a/not_yet_there.wav").name == "not_yet_there.wav"


@pytest.mark.parametrize("rel,reason", [("a/link.wav", "symlink"), ("linked_dir/secret.wav", "symlink"),
                                        ("../outside/secret.wav", "parent"), ("/etc/passwd", "absolute"),
                                        ("", "empty")])
def test_escapes_are_refused(tree, rel, reason):
    root, _, _ = tree
    with pytest.raises(PathEscapeError) as e:
        resolve_inside(root, rel)
    assert e.value.reason == reason


def test_the_user_may_allow_outside_paths(tree):
    root, outside, _ = tree
    assert resolve_inside(root, "a/link.wav", allow_outside=True) == (outside / "secret.wav").resolve()


@pytest.mark.xfail(strict=True, reason="resolve_in_root checks lexically: a symlink inside the root that points "
                                      "outside is followed")
def test_audio_resolver_refuses_a_symlink_leaving_the_root(tree):
    from megaflamingo.audio.decode import AudioError, resolve_in_root

    root, _, _ = tree
    with pytest.raises(AudioError, match="outside"):
        resolve_in_root(root, "a/link.wav")


@pytest.mark.xfail(strict=True, reason="inside_root checks lexically: a dataset directory symlinked to outside the "
                                      "data root is accepted")
def test_dataset_dir_symlinked_outside_is_refused(tree):
    from megaflamingo.data.reader import DataError, inside_root

    root, _, _ = tree
    with pytest.raises(DataError, match="outside"):
        inside_root(root, "linked_dir", False, what="x: dataset directory")
