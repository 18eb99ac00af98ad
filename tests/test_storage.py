"""raydistill.storage against the local filesystem and a real S3 server (moto, 127.0.0.1)."""

from __future__ import annotations

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
