"""raydistill.storage against the local filesystem and a real S3 server (moto, 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raydistill.storage import is_remote, storage_path

from .conftest import make_bucket


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return storage_path(tmp_path / "root")
    request.getfixturevalue("s3_server")
    return storage_path(make_bucket("storage-test") + f"/{tmp_path.name}")


def test_write_read_list_delete(root):
    assert not root.exists() and root.files() == []
    (root / "a" / "manifest.json").write_text('{"x": 1}')
    (root / "a" / "data" / "part-1.parquet").write_text("p1")
    (root / "a" / "data" / "part-0.parquet").write_text("p0")
    (root / "a" / "data" / "_SUCCESS").write_text("")  # markers are not data files
    assert (root / "a" / "manifest.json").read_text() == '{"x": 1}'
    assert (root / "a" / "manifest.json").is_file() and (root / "a").is_dir()
    assert [p.name for p in (root / "a" / "data").files(".parquet")] == ["part-0.parquet", "part-1.parquet"]
    assert [p.name for p in (root / "a" / "data" / "part-*.parquet").glob()] == ["part-0.parquet", "part-1.parquet"]
    (root / "a" / "manifest.json").write_text("new")  # overwrite in place
    assert (root / "a" / "manifest.json").read_text() == "new"
    (root / "a" / "data").delete()
    assert not (root / "a" / "data").exists() and (root / "a" / "manifest.json").exists()
    (root / "nothing").delete()  # absent: no error


def test_paths_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = storage_path("runs/x")
    assert local.uri == str(tmp_path / "runs" / "x") and not local.remote and local.local() == tmp_path / "runs" / "x"
    assert is_remote("s3://b/k") and not is_remote("/b/k")
    with pytest.raises(ValueError, match="needs a bucket"):
        storage_path("s3://")
    remote = storage_path("s3://bucket/prefix/")
    assert remote.uri == "s3://bucket/prefix" and remote.path == "bucket/prefix" and (remote / "c").uri == "s3://bucket/prefix/c"
    with pytest.raises(ValueError, match="on S3"):
        remote.local()


def test_ray_data_roundtrip_s3(s3_server, ray_local):
    """Ray Data writes and reads s3:// through the same filesystem object."""
    import ray

    root = storage_path(make_bucket("storage-ray") + "/rt")
    ray.data.range(50).repartition(3).write_parquet(root.uri, filesystem=root.fs)
    assert len(root.files(".parquet")) == 3
    assert sorted(r["id"] for r in ray.data.read_parquet(root.uri, filesystem=root.fs).take_all()) == list(range(50))


def _names(folder) -> list[str]:
    return sorted(p.path[len(folder.path):].lstrip("/") for p in folder.files())


def _folder_to_publish(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_text("w")
    (folder / "sub" / "tokenizer.json").write_text("t")
    (folder / "recipe.json").write_text("{}")
    return folder


@pytest.mark.parametrize("same_filesystem", [True, False])
def test_publish_folder_local_replaces_the_folder_whole(tmp_path, monkeypatch, same_filesystem):
    """A local destination: built beside it (stale builds of killed runs removed), renamed into
    place; from another filesystem, copied beside it first. What was there is gone, and so is
    every temporary folder."""
    from raydistill import storage
    from raydistill.storage import publish_folder, staging_folder

    dest = storage_path(tmp_path / "run" / "student")
    (dest / "old.bin").write_text("old")
    (tmp_path / "run" / "student.partial.killed").mkdir()  # left by a build that was killed
    if same_filesystem:
        with staging_folder(dest) as tmp:
            assert tmp.parent == tmp_path / "run" and tmp.name.startswith("student.partial.")
            assert not (tmp_path / "run" / "student.partial.killed").exists()
            built = _folder_to_publish(tmp / "student")
            publish_folder(built, dest, last="recipe.json")
    else:
        monkeypatch.setattr(storage, "_same_filesystem", lambda a, b: False)
        built = _folder_to_publish(tmp_path / "elsewhere" / "student")
        publish_folder(built, dest, last="recipe.json")
    assert _names(dest) == ["recipe.json", "sub/tokenizer.json", "weights.bin"]
    assert not built.exists()  # moved into place
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["student"]


def test_publish_folder_s3_uploads_the_last_file_last(s3_server, tmp_path, monkeypatch):
    """An s3:// destination: what was there is replaced, and ``last`` goes up only after every
    other file is there (a cut upload has no ``last``); the local folder is left as it was."""
    from raydistill import storage
    from raydistill.storage import publish_folder

    dest = storage_path(make_bucket("storage-publish") + f"/{tmp_path.name}/student")
    (dest / "old.bin").write_text("old")
    seen = []
    upload_dir = storage.upload_dir

    def recording(local, to):
        upload_dir(local, to)
        seen.append(_names(to))  # what is there once everything but ``last`` is up

    monkeypatch.setattr(storage, "upload_dir", recording)
    local = _folder_to_publish(tmp_path / "student")
    publish_folder(local, dest, last="recipe.json")
    assert seen == [["sub/tokenizer.json", "weights.bin"]]
    assert _names(dest) == ["recipe.json", "sub/tokenizer.json", "weights.bin"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "student", "student/recipe.json", "student/sub", "student/sub/tokenizer.json", "student/weights.bin"]
