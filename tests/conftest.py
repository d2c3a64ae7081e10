"""Shared fixtures: real small things built once per session (a stand-in checkpoint, an image folder)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests run offline and quietly; TensorFlow's C++ lines would only bury pytest's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session", autouse=True)
def _private_feature_cache(tmp_path_factory):
    """The feature cache of every run in the suite, subprocesses included, lives in a temporary folder:
    never the user's ~/.cache, and never features left there by an earlier run of the suite."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def _restore_logging():
    """An in-process cli.main sets the finetune logger's level and handler; each test starts as it found it."""
    logger = logging.getLogger("finetune")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder that ``make(folder)`` fills once for the whole test session, and its path.

    pytest-xdist runs a session fixture in every worker; for the costly ones (a stand-in checkpoint is 11 s,
    a trained run 12 s) the first worker to ask makes the folder under a lock, in the session's folder that
    all workers share, and the others wait for it and reuse it. What is made there is read, never written:
    a fixture that hands out something a test may write gives each worker its own copy. A run without
    xdist makes it in its own temporary folder."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder: the workers' folders are inside it
    folder = base / f"shared-{name}"
    with open(base / f"shared-{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a worker dies
        if not (folder / ".made").exists():  # a worker that failed half-way left no mark: start again
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def standin_checkpoint(tmp_path_factory) -> Path:
    """The published checkpoint's stand-in: 1001 classes, real names and shapes, random values, V1 file."""
    from finetune.synthetic import write_standin_checkpoint

    folder = made_once(tmp_path_factory, "pretrained",
                       lambda folder: write_standin_checkpoint(folder / "inception_v3.ckpt", seed=1))  # fmt: skip
    return folder / "inception_v3.ckpt"


@pytest.fixture(scope="session")
def standin_tarball(standin_checkpoint, tmp_path_factory) -> Path:
    """The stand-in of inception_v3_2016_08_28.tar.gz: a gzip tar holding one member, inception_v3.ckpt."""
    import tarfile

    from finetune.pretrained import PRETRAINED

    model = PRETRAINED["inception_v3"]

    def make(folder: Path) -> None:
        # Stored, not compressed: still a gzip stream, and random weights would not shrink anyway (level 1
        # took 4.5 s for nothing).
        with tarfile.open(folder / model.tarball, "w:gz", compresslevel=0) as archive:
            archive.add(standin_checkpoint, arcname=model.member)

    return made_once(tmp_path_factory, "published", make) / model.tarball


def checkpoint_tensors(prefix) -> dict:
    """Every tensor of a checkpoint, by name, as numpy arrays, read through one reader."""
    from finetune.compat import tf

    reader = tf.compat.v1.train.NewCheckpointReader(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


@pytest.fixture(scope="session")
def checkpoint_values(standin_checkpoint) -> dict:
    """Every tensor of the stand-in checkpoint, by name, as numpy arrays."""
    return checkpoint_tensors(standin_checkpoint)


def closed_port_url(path: str) -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once, as when offline."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


@dataclass(frozen=True)
class CliResult:
    """What a run of the command line left: its exit code and everything it wrote to stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None) -> CliResult:
    """Runs `finetune ARGS` in this process, through the same `cli.main` the console script calls.

    Output is captured as a subprocess's would be: stdout and stderr apart, log lines included (the finetune
    logger writes to whatever sys.stderr is), Python warnings printed on stderr, a usage error's exit code 2
    from argparse. TensorFlow is imported once per test session instead of once per call (3 to 5 s each). An
    exception main does not turn into an `error:` line is not caught here: it fails the test with its
    traceback, where a subprocess would have printed it and exited 1. Use `spawn_cli` where the separate
    process is the point (the console script, signals, what a fresh interpreter prints).
    """
    import contextlib
    import io
    import warnings

    from finetune import cli

    stdout, stderr = io.StringIO(), io.StringIO()

    def show(message, category, filename, lineno, file=None, line=None):
        stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    verbose = os.environ.get("FINETUNE_VERBOSE")  # -v sets it for the process
    before = Path.cwd()
    logger = logging.getLogger("finetune")  # main sets its level and handler for the process
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.showwarning = show
            try:
                code = cli.main(list(args))
            except SystemExit as exit:  # argparse: --help, --version, usage errors
                code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
                if isinstance(exit.code, str):
                    print(exit.code, file=sys.stderr)
    finally:
        os.chdir(before)
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate
        if verbose is None:
            os.environ.pop("FINETUNE_VERBOSE", None)
        else:
            os.environ["FINETUNE_VERBOSE"] = verbose
    return CliResult(code, stdout.getvalue(), stderr.getvalue())


def spawn_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m finetune ARGS` in a fresh process, as a user would, and captures its output."""
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def run_frozen_graph(path: Path, images):
    """An exported .pb's probabilities and logits for preprocessed images: its graph imported and run as it is.
    Grappler's rewrites are off: on a frozen InceptionV3 they cost more than the run (about 1.5 s of 1.9 s on
    a few images) and change its outputs by float rounding alone."""
    from finetune.compat import tf

    graph_def = tf.compat.v1.GraphDef.FromString(Path(path).read_bytes())
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph, config=config) as session:
        tf.compat.v1.import_graph_def(graph_def, name="")
        return tuple(session.run(["probabilities:0", "logits:0"], {"input:0": images}))


def validation_examples(run):
    """A run's validation split through the eval reader: preprocessed pixels, labels and source paths."""
    from finetune.compat import tf
    from finetune.dataset import load_dataset, read_dataset

    info = load_dataset(run.dataset)
    with tf.Graph().as_default():
        batch = tf.compat.v1.data.make_one_shot_iterator(
            read_dataset(info, "validation", batch_size=1000, image_size=run.image_size, training=False)
        ).get_next()
        with tf.compat.v1.Session() as session:
            values = session.run(batch)
    return values["image"], values["label"], [p.decode() for p in values["path"]]


# ------------------------------------------------------------------------------------- image folders


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels but holds almost no data: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def upright_picture():
    """A portrait picture whose top half is red and bottom half blue, so upside-down or sideways shows."""
    from PIL import Image

    picture = Image.new("RGB", (40, 64), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 40, 32))
    return picture


@dataclass(frozen=True)
class OddFolder:
    """A generated class folder tree with every kind of odd file a user's photos hold, and what to expect."""

    root: Path
    classes: tuple[str, ...]
    usable: dict[str, list[str]]  # class -> relative paths of the images that must be kept
    skipped: dict[str, str]  # relative path -> a word its reason must contain
    hidden: tuple[str, ...]  # relative paths that must be ignored entirely
    clean_jpegs: tuple[str, str]  # a plain RGB JPEG and a phone's MPO (JPEG + a second frame): kept as is
    rotated: str  # stored sideways with EXIF orientation 6
    duplicates: tuple[str, str]  # two files with the same bytes
    gif: str  # first frame red, second blue
    sixteen_bit: str  # a constant 16-bit grey of 128 * 257
    rgba: str  # fully transparent but for an opaque green square in the middle


def make_odd_folder(root: Path, images_per_class: int = 12, seed: int = 3) -> OddFolder:
    """make_image_folder's classes plus the zoo: bad files, odd formats, duplicates, hidden and nested files."""
    from PIL import Image

    from finetune.synthetic import make_image_folder

    folder = make_image_folder(root, num_classes=3, images_per_class=images_per_class, seed=seed,
                               min_side=48, max_side=96, png_fraction=0.25)  # fmt: skip
    discs, squares, triangles = folder.classes
    usable = {name: [p.relative_to(root).as_posix() for p in paths] for name, paths in folder.files.items()}
    jpegs = [p for p in folder.files[squares] if p.suffix == ".jpg"]
    sample = Image.open(jpegs[1]).convert("RGB")

    def write(relative: str, data: bytes | None = None, image=None, keep: bool = True, **save) -> str:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if image is not None:
            image.save(path, **save)
        else:
            path.write_bytes(data)
        if keep:
            usable[relative.split("/")[0]].append(relative)
        return relative

    half_jpeg = jpegs[2].read_bytes()[: jpegs[2].stat().st_size // 2]
    skipped = {
        write("README.txt", b"my photos\n", keep=False): "class folder",
        write(f"{discs}/empty.jpg", b"", keep=False): "empty",
        write(f"{discs}/truncated.jpg", half_jpeg, keep=False): "truncated",
        write(f"{squares}/notes.jpg", b"shopping list: eggs, milk\n", keep=False): "not an image",
        write(f"{squares}/bomb.png", png_header_only(10_000, 10_000), keep=False): "decompression bomb",
        write(f"{triangles}/huge.png", png_header_only(20_000, 20_000), keep=False): "decompression bomb",
    }  # fmt: skip
    hidden = (
        write(f"{discs}/.hidden.jpg", image=sample, keep=False, format="JPEG"),
        write(f"{discs}/.thumbnails/thumb.jpg", image=sample, keep=False, format="JPEG"),
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    sideways = upright_picture().transpose(Image.Transpose.ROTATE_90)
    rotated = write(f"{discs}/rotated.jpg", image=sideways, format="JPEG", exif=exif.tobytes(), quality=95)
    import numpy as np

    sixteen_bit = write(f"{discs}/deep.png", image=Image.fromarray(np.full((40, 50), 128 * 257, np.uint16)),
                        format="PNG")  # fmt: skip
    write(f"{squares}/actually_png.jpg", image=sample, format="PNG")
    write(f"{squares}/gray.jpg", image=sample.convert("L"), format="JPEG")
    duplicate = write(f"{squares}/nested/deeper/copy.jpg", jpegs[0].read_bytes())
    write(f"{triangles}/cmyk.jpg", image=sample.convert("CMYK"), format="JPEG")
    rgba_image = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    rgba_image.paste((0, 200, 0, 255), (16, 16, 32, 32))
    rgba = write(f"{triangles}/rgba.png", image=rgba_image, format="PNG")
    frames = [Image.new("RGB", (48, 40), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = write(f"{triangles}/anim.gif", image=frames[0], format="GIF", save_all=True, append_images=frames[1:])
    write(f"{triangles}/picture.bmp", image=sample, format="BMP")
    write(f"{triangles}/picture.webp", image=sample, format="WEBP")
    write(f"{triangles}/a/b/nested.jpg", image=sample, format="JPEG")
    phone = write(f"{triangles}/phone.jpg", image=frames[0], format="MPO", save_all=True, append_images=frames[1:])
    return OddFolder(
        root=root,
        classes=folder.classes,
        usable={name: sorted(paths) for name, paths in usable.items()},
        skipped=skipped,
        hidden=hidden,
        clean_jpegs=(jpegs[3].relative_to(root).as_posix(), phone),
        rotated=rotated,
        duplicates=(jpegs[0].relative_to(root).as_posix(), duplicate),
        gif=gif,
        sixteen_bit=sixteen_bit,
        rgba=rgba,
    )


@pytest.fixture(scope="session")
def odd_folder(tmp_path_factory) -> OddFolder:
    return make_odd_folder(tmp_path_factory.mktemp("odd") / "photos")


def slim_keys() -> dict:
    """A parse spec with slim's example keys alone (FACTS.md), written here rather than taken from finetune."""
    from finetune.compat import tf

    return {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
    }


def read_records(dataset_dir: Path) -> dict[str, list[dict]]:
    """Every record of every split, parsed with slim's keys and the file name: split -> list of dicts."""
    from finetune.compat import tf

    spec = {**slim_keys(), "image/filename": tf.io.FixedLenFeature([], tf.string)}
    records: dict[str, list[dict]] = {}
    for shard in sorted(Path(dataset_dir).glob("*.tfrecord")):
        split = shard.name.split("-")[0]
        for serialized in tf.data.TFRecordDataset(str(shard)):
            parsed = tf.io.parse_single_example(serialized, spec)
            record = {key.split("/")[-1]: value.numpy() for key, value in parsed.items()}
            record["filename"] = record["filename"].decode()
            records.setdefault(split, []).append(record)
    return records


def _make_trained_run(root: Path, checkpoint: Path) -> None:
    from finetune.config import TrainConfig
    from finetune.synthetic import make_image_folder
    from finetune.train import train

    photos = root / "photos"
    make_image_folder(photos, num_classes=6, images_per_class=12, seed=11, min_side=80, max_side=140,
                      png_fraction=0.0)  # fmt: skip
    built = run_cli("build-dataset", str(photos), "--out", str(root / "dataset"),
                    "--validation-fraction", "0.25", "--workers", "1")  # fmt: skip
    assert built.returncode == 0, built.stderr
    train(TrainConfig(dataset=str(root / "dataset"), train_dir=str(root / "run"), checkpoint=str(checkpoint),
                      image_size=75, batch_size=8, steps=40, eval_every=0))  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, standin_checkpoint):
    """A small finished run: 6 generated classes (JPEG only), 75-pixel images, 40 head steps. Trained once
    per session; each worker gets its own copy of the train dir (evaluate writes its reports there), while
    the photos and the dataset are shared and only read."""
    import shutil
    from types import SimpleNamespace

    from finetune.rundir import newest_checkpoint

    root = made_once(tmp_path_factory, "trained", lambda folder: _make_trained_run(folder, standin_checkpoint))
    train_dir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(root / "run", train_dir)
    return SimpleNamespace(root=root, photos=root / "photos", dataset=root / "dataset", train_dir=train_dir,
                           checkpoint=newest_checkpoint(train_dir), image_size=75)  # fmt: skip


@pytest.fixture(scope="session")
def exported_model(trained_run, tmp_path_factory) -> Path:
    """`finetune export` of the trained run, by default flags: model.pb beside model.json and model.labels.txt.
    Shared by every worker: tests read it or copy it, never write beside it."""

    def make(folder: Path) -> None:
        result = run_cli("export", "--train-dir", str(trained_run.root / "run"), "--out", str(folder / "model.pb"))
        assert result.returncode == 0, result.stderr

    return made_once(tmp_path_factory, "exported", make) / "model.pb"


@pytest.fixture(scope="session")
def trained_run_validation(trained_run, tmp_path_factory):
    """trained_run's validation split (pixels, labels, paths) and its checkpoint's float32 probabilities on
    it: the reference that export's graphs and --precision bf16 are compared with, computed once per session."""
    from types import SimpleNamespace

    import numpy as np

    def make(folder: Path) -> None:
        from finetune import model
        from finetune.compat import tf

        images, labels, paths = validation_examples(trained_run)
        with tf.Graph().as_default():
            net = model.build(tf.constant(images), 6)
            with tf.compat.v1.Session() as session:
                tf.compat.v1.train.Saver(model.model_variables()).restore(session, trained_run.checkpoint)
                probabilities = session.run(net.probabilities)
        np.savez(folder / "validation.npz", images=images, labels=labels, paths=np.array(paths),
                 probabilities=probabilities)  # fmt: skip

    with np.load(made_once(tmp_path_factory, "validation", make) / "validation.npz") as saved:
        return SimpleNamespace(images=saved["images"], labels=saved["labels"], paths=saved["paths"].tolist(),
                               probabilities=saved["probabilities"])  # fmt: skip
