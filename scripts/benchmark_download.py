"""Times `finetune download` of a stand-in tarball served from 127.0.0.1; prints one JSON object.

    python scripts/benchmark_download.py [--checkpoint inception_v3.ckpt]

Three runs into a fresh folder: a download (fetch, verify, unpack, TensorFlow read), a rerun that finds the
checkpoint present (hashes it against the manifest), and an install from the local tarball (everything but
the fetch). The difference of the first and the last is the fetch itself. Without --checkpoint a stand-in
with the real names and shapes is written first (about 10 s).
"""

from __future__ import annotations

import argparse
import functools
import json
import tarfile
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from finetune.config import DownloadConfig
from finetune.download import download
from finetune.pretrained import PRETRAINED


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def _timed(config: DownloadConfig) -> tuple[float, str]:
    started = time.perf_counter()
    result = download(config)
    return time.perf_counter() - started, result.status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a V1 inception_v3.ckpt to pack (default: write a stand-in)")
    args = parser.parse_args()
    model = PRETRAINED["inception_v3"]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            from finetune.synthetic import write_standin_checkpoint

            checkpoint = write_standin_checkpoint(work / "standin" / model.member, seed=1)
        served = work / "served"
        served.mkdir()
        tarball = served / model.tarball
        with tarfile.open(tarball, "w:gz") as archive:
            archive.add(checkpoint, arcname=model.member)

        handler = functools.partial(_QuietHandler, directory=str(served))
        with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
            threading.Thread(target=server.serve_forever, daemon=True).start()
            url = f"http://127.0.0.1:{server.server_port}/{model.tarball}"
            download(DownloadConfig(url=str(tarball), dest=str(work / "warm")))  # imports TensorFlow once
            dest = str(work / "checkpoints")
            fetched, fetched_status = _timed(DownloadConfig(url=url, dest=dest))
            present, present_status = _timed(DownloadConfig(url=url, dest=dest))
            local, local_status = _timed(DownloadConfig(url=str(tarball), dest=dest, force=True))
            server.shutdown()
        size = tarball.stat().st_size
        fetch_only = max(fetched - local, 1e-9)
        print(json.dumps({
            "tarball_bytes": size,
            "checkpoint_bytes": checkpoint.stat().st_size,
            "download_seconds": round(fetched, 3),
            "download_status": fetched_status,
            "download_mb_per_s": round(size / 1e6 / fetched, 1),
            "present_seconds": round(present, 3),
            "present_status": present_status,
            "local_tarball_seconds": round(local, 3),
            "local_tarball_status": local_status,
            "fetch_only_mb_per_s": round(size / 1e6 / fetch_only, 1),
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
