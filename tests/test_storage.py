"""unet.storage without a server: how local paths and URLs are named, staged, published and hashed,
and the one-line errors for locations that cannot be opened."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, environment
from unet import storage


def test_urls_stay_urls_and_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("s3://bucket/a/b.zarr/") == "s3://bucket/a/b.zarr"
    assert storage.resolve("out/x.zarr") == str(tmp_path / "out" / "x.zarr")
    assert storage.resolve("file://" + str(tmp_path / "y")) == str(tmp_path / "y")
    assert storage.is_url("s3://b/k") and not storage.is_url("file:///tmp/x") and not storage.is_url("x.zarr")
    assert storage.basename("s3://bucket/slides/x.ome.zarr/") == "x.ome.zarr" == storage.basename("a/x.ome.zarr")


def test_local_outputs_are_staged_beside_the_final_name_and_object_stores_in_place(tmp_path: Path) -> None:
    staged = storage.staging(tmp_path / "out.zarr", unique=False)
    assert staged.partial == str(tmp_path / ".out.zarr.partial") and not staged.in_place
    assert storage.staging(tmp_path / "out.zarr").partial.startswith(str(tmp_path / ".out.zarr.partial-"))
    remote = storage.staging("s3://bucket/out.zarr")
    assert remote.in_place and remote.partial == remote.final == "s3://bucket/out.zarr"


def test_publish_replaces_the_old_output_only_with_the_finished_one(tmp_path: Path) -> None:
    final = tmp_path / "out.zarr"
    (final / "old").mkdir(parents=True)
    staged = storage.staging(final)
    Path(staged.partial, "new").mkdir(parents=True)
    assert storage.publish(staged) == str(final)
    assert [p.name for p in final.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]  # no partial or old copy left behind


def test_sha256_of_a_file_and_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "store" / "a").mkdir(parents=True)
    (tmp_path / "store" / "a" / "0").write_bytes(b"chunk")
    (tmp_path / "store" / "zarr.json").write_bytes(b"{}")
    assert storage.sha256(tmp_path / "store" / "a" / "0") == hashlib.sha256(b"chunk").hexdigest()
    expected = hashlib.sha256(b"a/0" + b"chunk" + b"zarr.json" + b"{}").hexdigest()
    assert storage.sha256(tmp_path / "store") == expected
    (tmp_path / "store" / "a" / "0").rename(tmp_path / "store" / "a" / "1")  # names count, not only bytes
    assert storage.sha256(tmp_path / "store") != expected


def test_unknown_protocol_is_one_line_error() -> None:
    with pytest.raises(storage.StorageError, match="cannot open nosuch://x"):
        storage.exists("nosuch://x/y")


def test_unreachable_object_store_is_one_line_error_and_exit_2() -> None:
    env = environment() | {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_MAX_ATTEMPTS": "1",  # botocore would otherwise retry for about 10 s
    }
    cmd = [sys.executable, "-m", "pipelines.infer", "--set", "infer.input=s3://bucket/slide.ome.zarr",
           "--set", "infer.output=out.ome.zarr"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "python -m pipelines.infer: error: cannot reach s3://bucket/slide.ome.zarr: "
        'Could not connect to the endpoint URL: "http://127.0.0.1:9/bucket/slide.ome.zarr"'
    )
    assert "botocore" not in result.stderr  # no credential-lookup chatter


def test_a_delete_that_fails_is_an_error_not_silence(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    (gone / "sub").mkdir(parents=True)
    storage.remove(gone)
    storage.remove(gone)  # nothing there is fine
    assert not gone.exists()
    # entries of /proc cannot be deleted, even by root: the failure is reported, not swallowed
    with pytest.raises(storage.StorageError, match="cannot delete /proc/self/fdinfo: Operation not permitted"):
        storage.remove("/proc/self/fdinfo")


def test_writes_killed_before_their_rename_leave_nothing_in_a_finished_output(tmp_path: Path) -> None:
    """A SIGKILL between a temporary file and its rename (Zarr's local store, ``write_bytes``) left an empty
    ``tables/nuclei/zarr.<hex>.partial`` in a resumed batch's output; finishing an output removes such files only."""
    import uuid

    import zarr

    from unet.storage import remove_unfinished_writes, write_bytes

    group = zarr.open_group(tmp_path / "out.zarr", mode="w")
    group.create_array("a", shape=(4,), chunks=(2,), dtype="uint8")[:] = 1
    write_bytes(tmp_path / "out.zarr" / "tables" / "page.html", b"<p>")
    kept = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    left = [tmp_path / "out.zarr" / "tables" / f"zarr.{uuid.uuid4().hex}.partial",
            tmp_path / "out.zarr" / "a" / "c" / f"1.{uuid.uuid4().hex}.partial",
            tmp_path / "out.zarr" / "tables" / f".page.html.{uuid.uuid4().hex[:8]}.tmp"]  # fmt: skip
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert remove_unfinished_writes(tmp_path / "out.zarr") == 3
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == kept
    assert remove_unfinished_writes("s3://bucket/out.zarr") == 0  # an object store's puts are whole
