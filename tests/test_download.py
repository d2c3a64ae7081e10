"""`finetune download` against a real HTTP server on 127.0.0.1 serving a tarball built like the published one.

Every failure must give its own one-line error and exit 1, and leave nothing under the final names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tarfile
from datetime import datetime
from pathlib import Path

import pytest

from finetune import cli
from finetune.config import DownloadConfig
from finetune.download import download
from finetune.errors import DownloadError
from finetune.pretrained import PRETRAINED
from tests.conftest import closed_port_url, run_cli, spawn_cli
from tests.http_server import LocalServer, Route

MODEL = PRETRAINED["inception_v3"]
TARBALL = MODEL.tarball  # inception_v3_2016_08_28.tar.gz
PATH = f"/models/{TARBALL}"


def _tarball(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


@pytest.fixture(scope="module")
def tarball(standin_tarball) -> Path:
    return standin_tarball


@pytest.fixture(scope="module")
def tarball_bytes(tarball) -> bytes:
    return tarball.read_bytes()


@pytest.fixture(scope="module")
def checkpoint_bytes(standin_checkpoint) -> bytes:
    return standin_checkpoint.read_bytes()


@pytest.fixture
def server():
    with LocalServer() as running:
        yield running


@pytest.fixture
def dest(tmp_path):
    """The --dest folder; removed after the test, as each run writes about 200 MB."""
    folder = tmp_path / "checkpoints"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _closed_port_url() -> str:
    return closed_port_url(TARBALL)


def _finetune(capsys, dest: Path, url: str | None, *flags: str) -> tuple[int, str, str]:
    """Runs the real CLI in this process (TensorFlow is imported once); returns code, stdout, stderr."""
    code = cli.main(["download", "--dest", str(dest), *(["--url", url] if url else []), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, dest: Path, url: str | None, *flags: str) -> str:
    """Runs a download that must fail: exit 1, nothing under the final names; returns its error line."""
    code, _, err = _finetune(capsys, dest, url, *flags)
    assert code == 1, err
    _assert_nothing_final(dest)
    return _error_line(err)


def _error_line(err: str) -> str:
    """The one error line; the stderr above it holds only progress and retry warnings."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _assert_nothing_final(dest: Path) -> None:
    assert not (dest / MODEL.member).exists()
    assert not (dest / "inception_v3.manifest.json").exists()
    assert not list(dest.glob(".*.tmp")), "a temporary file was left behind"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------- success


def test_download_unpacks_verifies_and_writes_a_manifest_and_a_second_run_does_nothing(
    capsys, server, dest, tarball_bytes, checkpoint_bytes
):
    url = server.serve(PATH, Route(tarball_bytes))
    code, out, err = _finetune(capsys, dest, url)
    assert code == 0, err
    assert f"{dest / MODEL.member}: downloaded and verified (388 variables" in out
    size = f"{len(tarball_bytes) / 1e6:.1f} MB"
    assert f"downloading inception_v3: {size} of {size}" in err  # progress: log lines when not on a terminal
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes
    assert sorted(p.name for p in dest.iterdir()) == ["inception_v3.ckpt", "inception_v3.manifest.json"]
    manifest = json.loads((dest / "inception_v3.manifest.json").read_text())
    assert manifest["model"] == "inception_v3" and manifest["url"] == url
    assert manifest["tarball_size"] == len(tarball_bytes)
    assert manifest["tarball_sha256"] == _sha256(tarball_bytes)
    assert manifest["checkpoint_size"] == len(checkpoint_bytes)
    assert manifest["checkpoint_sha256"] == _sha256(checkpoint_bytes)
    assert manifest["variables"] == 388
    assert datetime.fromisoformat(manifest["date"]).tzinfo is not None

    requests_before = len(server.seen)
    code, out, err = _finetune(capsys, dest, url, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "present" and result["manifest"] == manifest
    assert len(server.seen) == requests_before, "a verified checkpoint must not touch the network"

    # Offline (nothing listens at the URL) with the checkpoint present: still fine.
    code, out, err = _finetune(capsys, dest, _closed_port_url(), "--retries", "0")
    assert code == 0, err
    assert "already present, verified" in out


def test_a_dropped_connection_is_resumed_by_the_next_run_with_a_range_request(
    capsys, server, dest, tarball_bytes, checkpoint_bytes
):
    cut = len(tarball_bytes) // 3
    url = server.serve(PATH, Route(tarball_bytes, drop_at=cut))
    error = _refused(capsys, dest, url, "--retries", "0")
    part = dest / f"{TARBALL}.part"
    kept = part.stat().st_size
    assert 0 < kept <= cut  # the read that hit the drop may lose its partial chunk
    assert error == (
        f"error: {url}: connection lost after {kept / 1e6:.1f} MB of {len(tarball_bytes) / 1e6:.1f} MB "
        f"(gave up after 1 try); rerun to resume from {part}, or raise --retries (now 0)"
    )

    code, out, err = _finetune(capsys, dest, url, "--json")
    assert code == 0, err
    assert server.ranges_seen(PATH) == [None, f"bytes={kept}-"]
    assert json.loads(out)["resumed_from"] == kept
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes  # what a clean download unpacks
    manifest = json.loads((dest / "inception_v3.manifest.json").read_text())
    assert manifest["tarball_sha256"] == _sha256(tarball_bytes)
    assert not part.exists()


def test_a_retry_within_one_run_resumes_where_the_connection_dropped(
    capsys, server, dest, tarball_bytes, checkpoint_bytes
):
    cut = len(tarball_bytes) // 2
    url = server.serve(PATH, Route(tarball_bytes, drop_at=cut))
    code, out, err = _finetune(capsys, dest, url, "--json")
    assert code == 0, err
    assert "connection lost after" in err and "retrying in 1 s" in err
    first, resumed = server.ranges_seen(PATH)
    assert first is None and 0 < int(resumed.removeprefix("bytes=").removesuffix("-")) <= cut
    assert json.loads(out)["status"] == "downloaded"
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes


def test_a_server_that_ignores_range_gets_the_file_rewritten_not_appended(
    capsys, server, dest, tarball_bytes, checkpoint_bytes
):
    dest.mkdir()
    (dest / f"{TARBALL}.part").write_bytes(b"left over from another file" * 1000)
    url = server.serve(PATH, Route(tarball_bytes, ranges=False))
    code, _, err = _finetune(capsys, dest, url)
    assert code == 0, err
    assert server.ranges_seen(PATH) == [f"bytes={27 * 1000}-"]
    assert "ignored the request to resume; downloading the whole file again" in err
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes


def test_a_complete_part_file_is_not_downloaded_again(capsys, server, dest, tarball_bytes, checkpoint_bytes):
    dest.mkdir()
    (dest / f"{TARBALL}.part").write_bytes(tarball_bytes)
    url = server.serve(PATH, Route(tarball_bytes))
    code, out, err = _finetune(capsys, dest, url)
    assert code == 0, err
    assert server.ranges_seen(PATH) == [f"bytes={len(tarball_bytes)}-"]  # answered 416, nothing sent
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes


def test_server_errors_are_retried_with_backoff(capsys, server, dest, tarball_bytes, checkpoint_bytes):
    url = server.serve(PATH, Route(tarball_bytes, status=500, fail_times=2))
    code, out, err = _finetune(capsys, dest, url)
    assert code == 0, err
    assert len(server.ranges_seen(PATH)) == 3
    assert "HTTP 500 Internal Server Error; retrying in 1 s (1 of 4 retries)" in err
    assert "retrying in 2 s (2 of 4 retries)" in err
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes


def test_an_unreachable_host_hands_over_to_the_next_url_of_the_row(
    monkeypatch, server, dest, tarball_bytes, checkpoint_bytes
):
    # A second row of the table: the same checkpoint, published at a dead host and at a live mirror.
    live = server.serve(PATH, Route(tarball_bytes))
    mirrored = dataclasses.replace(MODEL, name="mirrored", urls=(_closed_port_url(), live))
    monkeypatch.setitem(PRETRAINED, "mirrored", mirrored)
    result = download(DownloadConfig(pretrained="mirrored", dest=str(dest), retries=0))
    assert result.status == "downloaded" and result.manifest.url == live
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes


def test_a_local_tarball_is_unpacked_and_a_good_checkpoint_survives_a_bad_download(
    capsys, server, dest, tarball, tarball_bytes, checkpoint_bytes
):
    code, out, err = _finetune(capsys, dest, str(tarball))
    assert code == 0, err
    assert "unpacked and verified" in out
    assert tarball.exists(), "a tarball the user fetched by hand is theirs to keep"
    manifest_text = (dest / "inception_v3.manifest.json").read_text()
    assert json.loads(manifest_text)["url"] == str(tarball.resolve())

    for route in (Route(tarball_bytes[: len(tarball_bytes) // 2]), Route(b"", status=404)):
        url = server.serve(PATH, route)
        code, _, err = _finetune(capsys, dest, url, "--force")
        assert code == 1
        assert (dest / MODEL.member).read_bytes() == checkpoint_bytes
        assert (dest / "inception_v3.manifest.json").read_text() == manifest_text
    code, out, err = _finetune(capsys, dest, url)
    assert code == 0 and "already present, verified" in out


def test_temporary_files_left_by_a_killed_run_are_deleted_by_the_next(capsys, dest, tarball, checkpoint_bytes):
    dest.mkdir()
    for name in (".inception_v3.ckpt.k1ll3d.tmp", ".inception_v3.manifest.json.k1ll3d.tmp"):
        (dest / name).write_bytes(b"half written")
    (dest / "notes.txt").write_text("the user's own file")
    code, _, err = _finetune(capsys, dest, str(tarball))
    assert code == 0, err
    assert sorted(p.name for p in dest.iterdir()) == ["inception_v3.ckpt", "inception_v3.manifest.json", "notes.txt"]
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes


def test_a_second_download_into_the_same_folder_waits_for_the_first(dest, tarball, checkpoint_bytes):
    import fcntl
    import subprocess
    import sys
    import threading

    dest.mkdir()
    holder = os.open(dest, os.O_RDONLY)  # stands in for a first download: it holds the folder's lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    second = subprocess.Popen([sys.executable, "-m", "finetune", "download", "--dest", str(dest), "--url",
                               str(tarball)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    waiting = threading.Event()
    lines: list[str] = []

    def read_stderr():
        for line in second.stderr:
            lines.append(line)
            if "waiting for another finetune download" in line:
                waiting.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert waiting.wait(timeout=120), "".join(lines)
        assert second.poll() is None and not (dest / MODEL.member).exists()
    finally:
        os.close(holder)  # the first one finishes
    out = second.stdout.read()
    assert second.wait(timeout=120) == 0, "".join(lines)
    reader.join(timeout=10)
    assert "unpacked and verified" in out
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes
    assert lines[0].startswith(f"warning: waiting for another finetune download into {dest}"), lines


def test_a_checkpoint_changed_after_its_manifest_was_written_is_fetched_again(
    capsys, server, dest, tarball_bytes, checkpoint_bytes
):
    url = server.serve(PATH, Route(tarball_bytes))
    assert _finetune(capsys, dest, url)[0] == 0
    with open(dest / MODEL.member, "r+b") as damaged:
        damaged.seek(1000)
        damaged.write(b"\0" * 16)
    code, out, err = _finetune(capsys, dest, url)
    assert code == 0, err
    assert "has changed since" in err and "downloaded and verified" in out
    assert len(server.ranges_seen(PATH)) == 2
    assert (dest / MODEL.member).read_bytes() == checkpoint_bytes


# ------------------------------------------------------------------------------------------------ failures


def test_offline_without_the_checkpoint_says_how_to_get_it_by_hand(dest):
    # In a fresh process (no TensorFlow on this path, so it is quick): stderr holds the one line and nothing else.
    url = _closed_port_url()
    host = url.split("/")[2]
    result = spawn_cli("download", "--url", url, "--dest", str(dest), "--retries", "0", timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: cannot reach {host} (Connection refused); to install by hand, fetch {url} on a machine "
        f"with internet access, copy it to this one and run `finetune download --url PATH/TO/{TARBALL}`, "
        f"which verifies it and unpacks inception_v3.ckpt into {dest}/"
    ]
    assert result.stdout == ""
    assert not (dest / MODEL.member).exists()


def test_not_found_is_an_error_at_once(server, dest):
    url = server.serve(PATH, Route(b"", status=404))
    result = run_cli("download", "--url", url, "--dest", str(dest))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {url}: HTTP 404 Not Found; the file is not there for us: check --url, or fetch {TARBALL} "
        "by hand and pass its path with --url"
    ]
    assert len(server.seen) == 1, "a 4xx answer is not retried"
    _assert_nothing_final(dest)


def test_a_server_that_keeps_failing_is_given_up_on(capsys, server, dest, tarball_bytes):
    url = server.serve(PATH, Route(tarball_bytes, status=503))
    assert _refused(capsys, dest, url, "--retries", "1") == (
        f"error: {url}: HTTP 503 Service Unavailable (gave up after 2 tries); rerun later, or raise --retries "
        "(now 1)"
    )
    assert len(server.seen) == 2


def test_the_problem_comes_apart_from_its_fix_for_quickstart_which_shows_the_problem_alone(server, dest, tarball_bytes):
    # quickstart carries on without the checkpoint and names the problem, never `finetune download`'s flags.
    url = server.serve(PATH, Route(tarball_bytes, status=503))
    with pytest.raises(DownloadError) as caught:
        download(DownloadConfig(url=url, dest=str(dest), retries=0))
    assert caught.value.problem == f"{url}: HTTP 503 Service Unavailable (gave up after 1 try)"
    assert str(caught.value) == f"{caught.value.problem}; rerun later, or raise --retries (now 0)"


def test_a_stalled_server_times_out_instead_of_hanging(capsys, server, dest, tarball_bytes):
    url = server.serve(PATH, Route(tarball_bytes, stall_at=1 << 20))
    size = f"{len(tarball_bytes) / 1e6:.1f} MB"
    assert _refused(capsys, dest, url, "--timeout", "1", "--retries", "0") == (
        f"error: {url}: stalled, no data for 1 s (--timeout) after 1.0 MB of {size} (gave up after 1 try); "
        f"rerun to resume from {dest / TARBALL}.part, or raise --retries (now 0)"
    )


def test_a_wrong_digest_is_refused_and_the_download_deleted(capsys, server, dest, tarball_bytes):
    url = server.serve(PATH, Route(tarball_bytes))
    pinned = "0" * 64
    assert _refused(capsys, dest, url, "--sha256", pinned) == (
        f"error: {url}: sha256 is {_sha256(tarball_bytes)}, expected {pinned} (--sha256); the file is "
        "damaged or not the one published: fetch it again, or check the --sha256 value"
    )
    assert not (dest / f"{TARBALL}.part").exists()


def test_the_right_pinned_digest_is_accepted(capsys, server, dest, tarball_bytes):
    url = server.serve(PATH, Route(tarball_bytes))
    digest = _sha256(tarball_bytes).upper()  # as some tools print it
    code, out, err = _finetune(capsys, dest, url, "--sha256", digest)
    assert code == 0, err
    # A different pin no longer matches the manifest, so the checkpoint is fetched again (and refused).
    code, _, err = _finetune(capsys, dest, url, "--sha256", "1" * 64)
    assert code == 1 and "expected 1111" in _error_line(err)
    assert (dest / MODEL.member).exists(), "the verified checkpoint stays"


def test_a_malformed_digest_is_a_usage_error(capsys, dest):
    assert _refused(capsys, dest, None, "--sha256", "abc") == (
        "error: --sha256 abc: not a sha256 digest; give the 64 hex digits that `sha256sum FILE` prints"
    )


def test_an_html_page_is_recognised(capsys, server, dest):
    page = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Wi-Fi login</body></html>\n"
    url = server.serve(PATH, Route(page, content_type="text/html"))
    assert _refused(capsys, dest, url) == (
        f"error: {url}: an HTML page, not the tarball (a proxy's login page, or a URL of a web page); "
        "open it in a browser, then pass the file's direct address or a local copy with --url"
    )


def test_a_truncated_tarball_is_refused(capsys, server, dest, tarball_bytes):
    url = server.serve(PATH, Route(tarball_bytes[: len(tarball_bytes) // 2]))
    error = _refused(capsys, dest, url)
    assert error.startswith(f"error: {url}: truncated or damaged tarball (")
    assert error.endswith("); fetch it again")
    assert not (dest / f"{TARBALL}.part").exists()


def test_a_member_that_climbs_out_with_dot_dot_is_refused(capsys, server, dest, tmp_path):
    body = _tarball([_file("inception_v3.ckpt", b"harmless"), _file("../inception_v3.ckpt", b"escaped")])
    url = server.serve(PATH, Route(body))
    assert _refused(capsys, dest, url) == (
        f"error: {url}: refusing to unpack: member '../inception_v3.ckpt' climbs out of the folder with "
        "'..'; the published tarball holds only inception_v3.ckpt, so this is not it: check --url"
    )
    assert not (tmp_path / MODEL.member).exists()


def test_a_symlink_member_is_refused(capsys, server, dest):
    link = tarfile.TarInfo(MODEL.member)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    url = server.serve(PATH, Route(_tarball([(link, None)])))
    assert _refused(capsys, dest, url) == (
        f"error: {url}: refusing to unpack: member 'inception_v3.ckpt' is a symbolic link (to /etc/passwd); "
        "the published tarball holds only inception_v3.ckpt, so this is not it: check --url"
    )


def test_an_absolute_member_and_an_extra_member_are_refused(capsys, server, dest):
    cases = {
        "/tmp/inception_v3.ckpt": "member '/tmp/inception_v3.ckpt' has an absolute path",
        "README": "holds 'README', but the published tarball holds only inception_v3.ckpt",
    }
    for name, expected in cases.items():
        url = server.serve(PATH, Route(_tarball([_file(name, b"data")])))
        assert expected in _refused(capsys, dest, url)


def _v1_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> bytes:
    from finetune.compat import tf

    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        variables = [tf.compat.v1.get_variable(name, shape, initializer=tf.zeros_initializer())
                     for name, shape in shapes.items()]
        session.run(tf.compat.v1.global_variables_initializer())
        saver = tf.compat.v1.train.Saver(variables, write_version=tf.compat.v1.train.SaverDef.V1)
        saver.save(session, str(path), write_meta_graph=False, write_state=False)
    return path.read_bytes()


def test_a_checkpoint_that_is_not_inception_v3_is_refused(capsys, server, dest, tmp_path):
    five_classes = dict(MODEL.key_shapes)
    five_classes["InceptionV3/Logits/Conv2d_1c_1x1/weights"] = (1, 1, 2048, 5)
    few = {"InceptionV3/Conv2d_1a_3x3/weights": (3, 3, 3, 32)}
    cases = {
        b"not a checkpoint at all" * 100: (
            "inception_v3.ckpt inside is not a checkpoint of slim's InceptionV3 that TensorFlow can read"
        ),
        _v1_checkpoint(tmp_path / "few.ckpt", few): (
            "inception_v3.ckpt has no variable InceptionV3/Mixed_7c/Branch_3/Conv2d_0b_1x1/weights; "
            "it is not inception_v3: check --url"
        ),
        _v1_checkpoint(tmp_path / "five.ckpt", five_classes): (
            "inception_v3.ckpt has InceptionV3/Logits/Conv2d_1c_1x1/weights with shape [1, 1, 2048, 5], "
            "expected [1, 1, 2048, 1001]"
        ),
        _v1_checkpoint(tmp_path / "keys.ckpt", MODEL.key_shapes): (
            "inception_v3.ckpt has 6 variables under InceptionV3/, expected at least 388"
        ),
    }
    for member, expected in cases.items():
        url = server.serve(PATH, Route(_tarball([_file(MODEL.member, member)])))
        assert _refused(capsys, dest, url).startswith(f"error: {url}: {expected}")


def test_a_missing_local_file_names_the_flag(dest):
    with pytest.raises(DownloadError, match=r"^--url nowhere/x\.tar\.gz: no such file; pass an http"):
        download(DownloadConfig(url="nowhere/x.tar.gz", dest=str(dest)))
