"""Fetch, verify and unpack a pretrained checkpoint (`finetune download`).

``download`` reads top to bottom:

1. A checkpoint already in place whose manifest still matches its size and sha256 is the answer: nothing is
   fetched and the network is not touched.
2. The tarball: a local file (``--url PATH``) is read where it is; otherwise it is streamed into
   ``<dest>/<tarball>.part``. A ``.part`` left by an interrupted run is resumed with an HTTP Range request.
   Connection errors, timeouts and 5xx answers are retried with exponential backoff; an unreachable host
   hands over to the next URL of the model's row; a 4xx answer stops at once.
3. The tarball is checked: its sha256 (pinned with ``--sha256`` or known from the table), that it is a gzip
   tar holding exactly the expected member, and that no member is an absolute path, climbs out with ``..``,
   or is a link or device. Only that member is unpacked, by reading its bytes into a temporary file; nothing
   is ever extracted by name.
4. TensorFlow reads the unpacked checkpoint, which must hold the row's variables with the row's shapes.
5. Only then is it renamed to its final name, and a manifest (source, sizes, digests, date) is written beside
   it, also through a temporary name. The ``.part`` is deleted: the manifest keeps its digest, so the 100 MB
   tarball is not worth keeping.

All of it runs under an exclusive lock on the destination folder (``flock`` on the folder itself, so no
lock file is left behind): a second ``finetune download`` into the same folder waits for the first, then
finds its checkpoint in place. The lock also makes it safe to delete the temporary files a killed run left there.

A checkpoint already in place is replaced only by one that passed every check, so a bad download never
costs a good checkpoint, and no file under a final name is ever half written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import tarfile
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from finetune import __version__
from finetune.errors import CheckpointError, DownloadError
from finetune.files import open_temporary, write_text_atomically
from finetune.pretrained import PRETRAINED, PretrainedModel
from finetune.progress import Progress

if TYPE_CHECKING:
    import requests

    from finetune.config import DownloadConfig

log = logging.getLogger("finetune")

CHUNK_BYTES = 1 << 20  # read and write 1 MiB at a time: few syscalls, steady progress updates
FIRST_BACKOFF_SECONDS = 1.0  # wait before the first retry; it doubles with each retry after that
MAX_BACKOFF_SECONDS = 30.0


@dataclass(frozen=True)
class Manifest:
    """What was installed and from where; written as JSON beside the checkpoint once it has verified.

    A later run trusts the checkpoint without the network when its size and sha256 still match these.
    """

    model: str
    url: str  # the URL the tarball came from, or the absolute path of a local tarball
    tarball_size: int
    tarball_sha256: str
    checkpoint_size: int
    checkpoint_sha256: str
    variables: int  # variables under the model's root scope that TensorFlow found in the checkpoint
    date: str  # when it was installed, UTC, ISO 8601


@dataclass(frozen=True)
class DownloadResult:
    """What ``download`` did and where the checkpoint is."""

    status: str  # "downloaded"; "unpacked" from a local tarball; "present": verified earlier, nothing done
    checkpoint: Path
    manifest_path: Path
    manifest: Manifest
    resumed_from: int = 0  # bytes of an earlier run's .part that this run kept


def manifest_path_for(dest: Path, model: PretrainedModel) -> Path:
    """Where the manifest of a model's checkpoint lives: ``<dest>/inception_v3.manifest.json``."""
    return dest / f"{PurePosixPath(model.member).stem}.manifest.json"


def download(config: DownloadConfig) -> DownloadResult:
    """Makes sure ``<dest>/<member>`` holds the verified pretrained checkpoint; fetches it if it does not.

    Raises:
        DownloadError: the host cannot be reached, the server refused or kept failing, or the file did not
            verify; the message says which and what to do. Nothing is left under the final names.
    """
    model = PRETRAINED[config.pretrained]
    dest = Path(config.dest)
    checkpoint = dest / model.member
    manifest_path = manifest_path_for(dest, model)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            f"--dest {dest}: cannot create the folder ({exc.strerror})", "choose another --dest"
        ) from None

    with _exclusive(dest):
        # Checked under the lock: another download into this folder may have just put the checkpoint there.
        if not config.force:
            manifest = _present_manifest(checkpoint, manifest_path, model, config.sha256)
            if manifest is not None:
                return DownloadResult("present", checkpoint, manifest_path, manifest)
        _sweep_temporary_files(dest, (checkpoint, manifest_path))
        return _download_locked(config, model, dest, checkpoint, manifest_path)


def _download_locked(
    config: DownloadConfig, model: PretrainedModel, dest: Path, checkpoint: Path, manifest_path: Path
) -> DownloadResult:
    """Steps 2 to 5 of ``download``, with the folder's lock held and no verified checkpoint in place."""
    if config.url and not is_web_address(config.url):
        tarball = Path(config.url)
        if not tarball.is_file():
            raise DownloadError(
                f"--url {config.url}: no such file",
                f"pass an http(s) URL, or the path of {model.tarball} downloaded by hand",
            )
        manifest = _install(tarball, str(tarball.resolve()), model, config.sha256, checkpoint, manifest_path)
        return DownloadResult("unpacked", checkpoint, manifest_path, manifest)

    part = dest / f"{model.tarball}.part"
    urls = (config.url,) if config.url else model.urls
    url, resumed_from = _fetch(urls, part, model, dest, config)
    try:
        manifest = _install(part, url, model, config.sha256, checkpoint, manifest_path)
    except _BadTarball:
        part.unlink(missing_ok=True)  # resuming a file that failed its checks would only fail again
        raise
    part.unlink()
    return DownloadResult("downloaded", checkpoint, manifest_path, manifest, resumed_from)


@contextlib.contextmanager
def _exclusive(dest: Path):
    """Holds an exclusive lock on the folder ``dest``, waiting (and saying so) while another process has it.

    Where the folder cannot be locked (Windows has no flock, some network mounts refuse it) the download runs
    unguarded.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = None
    try:
        descriptor = os.open(dest, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(f"waiting for another finetune download into {dest} to finish")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
    except OSError as exc:
        log.debug(f"cannot lock {dest} ({exc.strerror}); carrying on unguarded")
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


def _sweep_temporary_files(dest: Path, finals: tuple[Path, ...]) -> None:
    """Deletes the temporary files a killed run left beside ``finals`` (only ever called under the lock)."""
    for final in finals:
        for stale in dest.glob(f".{final.name}.*.tmp"):
            log.info(f"deleting {stale}, left by an interrupted download")
            stale.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- already there


def _present_manifest(
    checkpoint: Path, manifest_path: Path, model: PretrainedModel, pinned_sha256: str | None
) -> Manifest | None:
    """The manifest of a checkpoint already in place that still matches it, else None (saying why)."""
    if not checkpoint.is_file():
        return None
    try:
        manifest = Manifest(**json.loads(manifest_path.read_text()))
    except FileNotFoundError:
        log.info(f"{checkpoint} has no manifest, so it was not verified; fetching the checkpoint again")
        return None
    except (OSError, ValueError, TypeError):
        log.warning(f"{manifest_path} is unreadable; fetching the checkpoint again")
        return None
    if manifest.model != model.name:
        log.warning(f"{manifest_path} describes {manifest.model}, not {model.name}; fetching again")
        return None
    if pinned_sha256 and manifest.tarball_sha256 != pinned_sha256:
        log.info(f"{checkpoint} came from a tarball whose sha256 is not --sha256; fetching again")
        return None
    size = checkpoint.stat().st_size
    if size != manifest.checkpoint_size or _sha256(checkpoint) != manifest.checkpoint_sha256:
        log.warning(f"{checkpoint} has changed since {manifest_path} was written; fetching it again")
        return None
    return manifest


# ------------------------------------------------------------------------------------------------ fetching


class _Unreachable(Exception):
    """No answer at all from a host: name lookup failed, connection refused or timed out."""

    def __init__(self, host: str, reason: str):
        super().__init__(f"cannot reach {host} ({reason})")
        self.reason = reason


class _Transient(Exception):
    """A failure worth retrying: a 5xx answer, no answer in time, a connection lost mid-body."""


def is_web_address(url: str) -> bool:
    """Whether --url names an http(s) address rather than a local tarball."""
    return urlsplit(url).scheme in ("http", "https")


def _fetch(
    urls: tuple[str, ...], part: Path, model: PretrainedModel, dest: Path, config: DownloadConfig
) -> tuple[str, int]:
    """Streams the tarball into ``part`` from the first URL that answers; returns that URL and the bytes
    of an earlier ``part`` that were kept.

    Each failure that is worth retrying waits (1, 2, 4, ... s) and tries again, resuming from what is
    already in ``part``; a host that cannot be reached hands over to the next URL at once, and only a round
    in which no URL could be reached counts as a failure. A try that added to ``part`` before failing
    starts the count afresh: a flaky connection that keeps making progress is not given up on.
    """
    import requests

    resumed_from = part.stat().st_size if part.exists() else 0
    hosts = " or ".join(dict.fromkeys(urlsplit(url).netloc for url in urls))
    failures = 0
    index = 0
    with requests.Session() as session:
        session.headers["User-Agent"] = f"finetune/{__version__} {requests.utils.default_user_agent()}"
        while True:
            url = urls[index]
            size_before = part.stat().st_size if part.exists() else 0
            try:
                _fetch_once(session, url, part, model, config.timeout)
                return url, resumed_from
            except _Unreachable as exc:
                if index + 1 < len(urls):
                    log.debug(f"{exc}; trying {urls[index + 1]}")  # the result or the error names both
                    index += 1
                    continue
                problem: Exception = _Unreachable(hosts, exc.reason)
                index = 0
            except _Transient as exc:
                problem = exc
                if part.exists() and part.stat().st_size > size_before:
                    failures = 0
            failures += 1
            if failures > config.retries:
                break
            delay = min(FIRST_BACKOFF_SECONDS * 2 ** (failures - 1), MAX_BACKOFF_SECONDS)
            log.warning(f"{problem}; retrying in {delay:g} s ({failures} of {config.retries} retries)")
            time.sleep(delay)
    if isinstance(problem, _Unreachable):
        raise DownloadError(
            str(problem),
            f"to install by hand, fetch {urls[0]} on a machine with internet access, copy it to this one and "
            f"run `finetune download --url PATH/TO/{model.tarball}`, which verifies it and unpacks "
            f"{model.member} into {dest}/",
        )
    tries = f"{failures} {'try' if failures == 1 else 'tries'}"
    rerun = f"rerun to resume from {part}" if part.exists() and part.stat().st_size else "rerun later"
    raise DownloadError(f"{problem} (gave up after {tries})", f"{rerun}, or raise --retries (now {config.retries})")


def _fetch_once(
    session: requests.Session, url: str, part: Path, model: PretrainedModel, timeout: float
) -> None:
    """One request: appends the rest of the file to ``part``, or rewrites it when the server sends all."""
    import requests

    host = urlsplit(url).netloc
    start = part.stat().st_size if part.exists() else 0
    # identity: the bytes on disk must be the tarball's, not a transfer-encoded copy of them.
    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
        log.info(f"resuming {part} at {_megabytes(start)}")
    log.debug(f"fetching {url} into {part}")
    try:
        response = session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.ConnectionError as exc:  # also a connect timeout
        raise _Unreachable(host, _connection_problem(exc, timeout)) from None
    except requests.Timeout:
        raise _Transient(f"{url}: no answer within {timeout:g} s (--timeout)") from None
    except requests.RequestException as exc:
        raise DownloadError(f"{url}: cannot fetch it ({exc})", "check --url") from None

    with response:
        status = response.status_code
        if status == 416 and start:
            total = _content_range(response.headers.get("Content-Range", ""))[1]
            if total == start:
                log.info(f"{part} is already complete")
                return
            log.warning(f"{part} is longer than the file on {host} ({start} > {total} bytes); starting over")
            part.unlink()
            _fetch_once(session, url, part, model, timeout)  # without a Range this time
            return
        if status >= 500:
            raise _Transient(f"{url}: HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise DownloadError(
                f"{url}: HTTP {status} {response.reason}",
                f"the file is not there for us: check --url, or fetch {model.tarball} by hand and pass its path "
                "with --url",
            )
        if status == 206:
            first, total = _content_range(response.headers.get("Content-Range", ""))
            if first != start:
                part.unlink()
                raise _Transient(f"{url}: asked for bytes from {start}, got them from {first}")
        else:
            if start:
                log.warning(f"{host} ignored the request to resume; downloading the whole file again")
            start = 0
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
        progress = Progress(f"downloading {model.name}", total, unit="bytes", start=start)
        _stream_body(response, url, part, start, total, timeout, progress)


def _stream_body(
    response: requests.Response,
    url: str,
    part: Path,
    start: int,
    total: int | None,
    timeout: float,
    progress: Progress,
) -> None:
    """Writes the body to ``part`` (appending at ``start``, or from scratch when ``start`` is 0)."""
    import requests

    received = start
    last_data = time.monotonic()
    try:
        with open(part, "ab" if start else "wb") as out, progress:
            for chunk in response.iter_content(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                last_data = time.monotonic()
                progress.advance(len(chunk))
    except requests.RequestException as exc:
        got = f"{_megabytes(received)} of {_megabytes(total) if total else 'an unknown size'}"
        if time.monotonic() - last_data >= timeout:
            raise _Transient(f"{url}: stalled, no data for {timeout:g} s (--timeout) after {got}") from None
        log.debug(f"{url}: {exc!r}")
        raise _Transient(f"{url}: connection lost after {got}") from None
    except OSError as exc:
        raise DownloadError(
            f"cannot write {part} ({exc.strerror})", "free some space or choose another --dest"
        ) from None
    if total is not None and received < total:
        raise _Transient(f"{url}: connection closed after {_megabytes(received)} of {_megabytes(total)}")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes 100-199/1000`` or ``bytes */1000``; None where not given."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if not match:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total and total != "*" else None)


def _connection_problem(exc: Exception, timeout: float) -> str:
    """The short reason under requests' long connection error: 'Connection refused', a DNS failure, ..."""
    import requests

    if isinstance(exc, requests.ConnectTimeout):
        return f"no connection within {timeout:g} s"
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return match.group(1).strip() if match else type(exc).__name__


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------ verification


class _BadTarball(DownloadError):
    """The tarball came but is not the expected one: wrong digest, not a gzip tar, unsafe or wrong member."""


def _install(
    tarball: Path,
    source: str,
    model: PretrainedModel,
    pinned_sha256: str | None,
    checkpoint: Path,
    manifest_path: Path,
) -> Manifest:
    """Verifies the tarball and the checkpoint inside, then renames it into place and writes the manifest."""
    tarball_sha256 = _sha256(tarball)
    expected = pinned_sha256 or model.sha256
    if expected and tarball_sha256 != expected:
        origin = "--sha256" if pinned_sha256 else f"the published digest of {model.name}"
        raise _BadTarball(
            f"{source}: sha256 is {tarball_sha256}, expected {expected} ({origin})",
            "the file is damaged or not the one published: fetch it again, or check the --sha256 value",
        )
    tarball_size = tarball.stat().st_size
    if model.size is not None and tarball_size != model.size:
        raise _BadTarball(f"{source}: {tarball_size} bytes, expected {model.size}", "fetch it again")
    try:
        unpacked, checkpoint_sha256 = _unpack_member(tarball, source, model, checkpoint.parent)
    except OSError as exc:
        raise DownloadError(
            f"cannot unpack {tarball} into {checkpoint.parent} ({exc.strerror})",
            "free some space or choose another --dest",
        ) from None
    try:
        log.info(f"checking {model.member} with TensorFlow")
        variables = _check_variables(unpacked, source, model)
        os.replace(unpacked, checkpoint)
    finally:
        unpacked.unlink(missing_ok=True)
    manifest = Manifest(
        model=model.name,
        url=source,
        tarball_size=tarball_size,
        tarball_sha256=tarball_sha256,
        checkpoint_size=checkpoint.stat().st_size,
        checkpoint_sha256=checkpoint_sha256,
        variables=variables,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    text = json.dumps(dataclasses.asdict(manifest), indent=2, sort_keys=True)
    write_text_atomically(manifest_path, text + "\n")
    log.debug(f"{checkpoint}: {variables} variables, sha256 {checkpoint_sha256}")
    return manifest


def _unpack_member(tarball: Path, source: str, model: PretrainedModel, folder: Path) -> tuple[Path, str]:
    """Checks every member of the tarball and copies the expected one's bytes to a temporary file.

    Returns the temporary file (in ``folder``, so that a rename puts it in place) and its sha256. The
    tarball is read as one stream, so a truncated or corrupt one fails here, gzip CRC included.
    """
    with open(tarball, "rb") as raw:
        head = raw.read(512)
    if not head.startswith(b"\x1f\x8b"):
        text = head.lstrip().lower()
        if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
            raise _BadTarball(
                f"{source}: an HTML page, not the tarball (a proxy's login page, or a URL of a web page)",
                "open it in a browser, then pass the file's direct address or a local copy with --url",
            )
        raise _BadTarball(f"{source}: not a gzip file (it starts with {head[:12]!r})", "check --url")

    descriptor, unpacked = open_temporary(Path(folder) / model.member)  # the umask's mode, as every output
    digest = hashlib.sha256()
    found = False
    try:
        with os.fdopen(descriptor, "wb") as out, gzip.open(tarball) as stream:
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    _check_member(member, source, model)
                    if found:
                        raise _BadTarball(f"{source}: holds {model.member} twice", "check --url")
                    found = True
                    reader = archive.extractfile(member)
                    while chunk := reader.read(CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
            while stream.read(CHUNK_BYTES):  # read to the end, so that gzip checks its CRC and length
                pass
            out.flush()
            os.fsync(out.fileno())
        if not found:
            raise _BadTarball(f"{source}: the tarball is empty, expected {model.member} in it", "check --url")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        unpacked.unlink(missing_ok=True)
        reason = str(exc) or type(exc).__name__
        raise _BadTarball(f"{source}: truncated or damaged tarball ({reason})", "fetch it again") from None
    except BaseException:
        unpacked.unlink(missing_ok=True)
        raise
    return unpacked, digest.hexdigest()


def _check_member(member: tarfile.TarInfo, source: str, model: PretrainedModel) -> None:
    """Refuses a member that could write outside the folder or is not the expected regular file."""
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute():
        unsafe = "has an absolute path"
    elif ".." in path.parts:
        unsafe = "climbs out of the folder with '..'"
    elif member.issym():
        unsafe = f"is a symbolic link (to {member.linkname})"
    elif member.islnk():
        unsafe = f"is a hard link (to {member.linkname})"
    elif member.isdev():
        unsafe = "is a device or a pipe"
    elif not member.isfile():
        unsafe = "is not a regular file"
    else:
        unsafe = ""
    if unsafe:
        raise _BadTarball(
            f"{source}: refusing to unpack: member {name!r} {unsafe}",
            f"the published tarball holds only {model.member}, so this is not it: check --url",
        )
    if path.as_posix().removeprefix("./") != model.member:
        raise _BadTarball(
            f"{source}: holds {name!r}, but the published tarball holds only {model.member}", "check --url"
        )


def _check_variables(unpacked: Path, source: str, model: PretrainedModel) -> int:
    """Has TensorFlow read the checkpoint and checks the row's variables; returns the count under the root.

    Imports TensorFlow (through finetune.model), which is why it runs last.
    """
    from finetune.model import open_checkpoint

    try:
        shapes = open_checkpoint(unpacked, flag="--url").shapes
    except CheckpointError as exc:
        log.debug(str(exc))
        raise _BadTarball(
            f"{source}: {model.member} inside is not a checkpoint of slim's InceptionV3 that TensorFlow can read",
            "the file is damaged or another model's: check --url",
        ) from None
    for name, shape in model.key_shapes.items():
        if name not in shapes:
            problem = f"has no variable {name}"
        elif tuple(shapes[name]) != shape:
            problem = f"has {name} with shape {list(shapes[name])}, expected {list(shape)}"
        else:
            continue
        raise _BadTarball(f"{source}: {model.member} {problem}", f"it is not {model.name}: check --url")
    count = sum(1 for name in shapes if name.startswith(model.root_scope + "/"))
    if count < model.min_variables:
        raise _BadTarball(
            f"{source}: {model.member} has {count} variables under {model.root_scope}/, expected at least "
            f"{model.min_variables}",
            f"it is not the full {model.name} checkpoint: check --url",
        )
    return count


# ----------------------------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


