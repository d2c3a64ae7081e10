"""The pretrained checkpoints finetune can fetch: where each is published and what it must hold.

One row per model. `finetune download --pretrained NAME` reads everything it needs from the row, so supporting
another published slim checkpoint is a new row here, not new code. Pure data: importing this module is free,
which lets the CLI offer the names as choices without loading anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from posixpath import basename
from urllib.parse import urlsplit


@dataclass(frozen=True)
class PretrainedModel:
    """A published checkpoint tarball and the facts used to verify it.

    Attributes:
        name: the ``--pretrained`` value.
        urls: where the tarball is published, tried in order; later ones are mirrors used when an earlier
            host cannot be reached.
        member: the one file inside the tarball, which is also the checkpoint's name once unpacked.
        root_scope: the variable scope every model variable lives under.
        min_variables: how many variables under ``root_scope`` the checkpoint must hold at least (a global
            step or other extras outside the model are allowed).
        key_shapes: variables that must be present with exactly these shapes; chosen so that a checkpoint of
            another network, or of this one with another head, fails.
        size: the tarball's size in bytes, when published.
        sha256: the tarball's sha256, when published; ``--sha256`` pins one when it is not.
    """

    name: str
    urls: tuple[str, ...]
    member: str
    root_scope: str
    min_variables: int
    key_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    size: int | None = None
    sha256: str | None = None

    @property
    def tarball(self) -> str:
        """The tarball's file name, from its first URL (``inception_v3_2016_08_28.tar.gz``)."""
        return basename(urlsplit(self.urls[0]).path)


PRETRAINED: dict[str, PretrainedModel] = {
    model.name: model
    for model in (
        PretrainedModel(
            name="inception_v3",
            urls=(
                "http://download.tensorflow.org/models/inception_v3_2016_08_28.tar.gz",
                # The same bucket over https, for networks that block plain http.
                "https://storage.googleapis.com/download.tensorflow.org/models/inception_v3_2016_08_28.tar.gz",
            ),
            member="inception_v3.ckpt",
            root_scope="InceptionV3",
            # tf_slim's inception_v3(num_classes=1001): 388 model variables, batch-norm moving statistics
            # included, no gamma.
            min_variables=388,
            key_shapes={
                "InceptionV3/Conv2d_1a_3x3/weights": (3, 3, 3, 32),
                "InceptionV3/Mixed_7c/Branch_3/Conv2d_0b_1x1/weights": (1, 1, 2048, 192),
                "InceptionV3/AuxLogits/Conv2d_2a_5x5/weights": (5, 5, 128, 768),
                "InceptionV3/AuxLogits/Conv2d_2b_1x1/weights": (1, 1, 768, 1001),
                "InceptionV3/Logits/Conv2d_1c_1x1/weights": (1, 1, 2048, 1001),
                "InceptionV3/Logits/Conv2d_1c_1x1/biases": (1001,),
            },
            size=None,  # neither size nor checksum is published for this tarball
            sha256=None,
        ),
    )
}
DEFAULT_MODEL = "inception_v3"
