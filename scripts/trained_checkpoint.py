"""Writes a slim InceptionV3 checkpoint with trained weights from the npm package nsfwjs 4.4.0.

    npm pack nsfwjs@4.4.0                       # 25 MB, from the npm registry
    python scripts/trained_checkpoint.py nsfwjs-4.4.0.tgz --out /tmp/trained/inception_v3.ckpt
    python scripts/benchmark.py --checkpoint /tmp/trained/inception_v3.ckpt --table

Why it exists. The benchmark's bf16 agreement depends on the weights, and the stand-in's random ones amplify
any small change of the input block by block, so they overstate what bf16 rounding does. The published
slim checkpoint cannot be fetched from a machine that reaches only package registries. The only trained
InceptionV3 weights found in a registry are inside nsfwjs (MIT licence): a Keras InceptionV3 started from
the ImageNet weights and fine-tuned (from conv2d_56 on, by its authors' training scripts) as a 5-class
image filter, stored as TensorFlow.js weights quantized to 8 bits per tensor. They make a trained network,
not slim's ImageNet one: good enough to see how a trained network takes bf16, not a substitute for the
real checkpoint in anything else. Nothing of nsfwjs is kept in this repository.

Keras builds InceptionV3 layer for layer in slim's order (each convolution followed by a batch norm without
gamma, epsilon 0.001, the Mixed blocks' branches in the same order), so its 94 conv2d_N/batch_normalization_N
pairs map in creation order onto slim's 94 convolutions; every shape is checked. nsfwjs's own head (dense
layers after the final pool) is dropped; AuxLogits and Logits keep slim's fresh initialisation with 1001
classes, as the published checkpoint has them, and finetune replaces them for the user's classes anyway.
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
import tarfile
from pathlib import Path

import numpy as np

MODEL = "package/dist/models/inception_v3"
SHARDS = 6
CONVOLUTIONS = 94
# One weight of the tfjs manifest, as nsfwjs's minified model.min.js writes it.
WEIGHT = re.compile(
    r'\{name:"([^"]+)",shape:\[([0-9,]*)\],dtype:"float32",'
    r'quantization:\{min:([-+0-9.e]+),scale:([-+0-9.e]+),dtype:"uint8"\}\}'
)
SHARD_BYTES = re.compile(r'exports="([A-Za-z0-9+/=]+)"')


def read_keras_weights(package: Path) -> dict[str, np.ndarray]:
    """The dequantized weights of nsfwjs's InceptionV3, by Keras name, from the npm tarball."""
    fix = "pass the file `npm pack nsfwjs@4.4.0` writes"
    try:
        with tarfile.open(package) as tar:

            def text(name: str) -> str:
                try:
                    return tar.extractfile(f"{MODEL}/{name}").read().decode("utf-8")
                except KeyError:
                    raise SystemExit(f"error: {package}: no {MODEL}/{name} in it; {fix}") from None

            manifest = WEIGHT.findall(text("model.min.js"))
            shards = [SHARD_BYTES.search(text(f"group1-shard{i}of{SHARDS}.min.js")) for i in range(1, SHARDS + 1)]
    except OSError as exc:
        raise SystemExit(f"error: {package}: cannot read it ({exc.strerror}); {fix}") from None
    except tarfile.TarError:
        raise SystemExit(f"error: {package}: not a tar archive; {fix}") from None
    if not manifest or not all(shards):
        raise SystemExit(f"error: {package}: its InceptionV3 files are not in the layout of 4.4.0; {fix}")
    data = b"".join(base64.b64decode(shard.group(1)) for shard in shards)
    weights, offset = {}, 0
    for name, shape_text, low, scale in manifest:
        shape = [int(size) for size in shape_text.split(",") if size]
        count = int(np.prod(shape))
        codes = np.frombuffer(data, np.uint8, count, offset)
        offset += count
        weights[name] = (float(low) + float(scale) * codes.astype(np.float64)).astype(np.float32).reshape(shape)
    if offset != len(data):
        raise SystemExit(f"error: {package}: the manifest covers {offset} bytes of {len(data)}; {fix}")
    return weights


def keras_order() -> list[str]:
    """Keras's backbone weights in creation order: each convolution's kernel, then its batch norm's three."""
    names = []
    for n in range(1, CONVOLUTIONS + 1):
        names.append(f"conv2d_{n}/kernel")
        names += [f"batch_normalization_{n}/{part}" for part in ("beta", "moving_mean", "moving_variance")]
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", help="nsfwjs-4.4.0.tgz, as `npm pack nsfwjs@4.4.0` writes it")
    parser.add_argument("--out", required=True, help="checkpoint prefix to write (V2)")
    args = parser.parse_args()
    keras = read_keras_weights(Path(args.package))

    from finetune import model
    from finetune.compat import tf

    with tf.Graph().as_default():
        model.build(tf.zeros([1, 299, 299, 3]), 1001, train_scopes=model.PRESETS["all"])
        variables = model.variables_to_restore(())
        backbone = [v for v in variables if model.scope_of(v.op.name) not in model.HEAD_SCOPES]
        order = keras_order()
        if len(backbone) != len(order):
            raise SystemExit(f"error: slim has {len(backbone)} backbone variables, Keras {len(order)}")
        assignments = {}
        for variable, name in zip(backbone, order):
            slim_part = variable.op.name.rsplit("/", 1)[1]
            keras_part = name.rsplit("/", 1)[1].replace("kernel", "weights")
            if slim_part != keras_part or variable.shape.as_list() != list(keras[name].shape):
                raise SystemExit(f"error: {variable.op.name} {variable.shape} does not match {name} "
                                 f"{keras[name].shape}")  # fmt: skip
            assignments[variable] = keras[name]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as session:
            # The backbone's values fed in place of their initial values; the heads keep their initialisers.
            initial = {variable.initial_value: value for variable, value in assignments.items()}
            session.run(tf.compat.v1.global_variables_initializer(), initial)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            print(saver.save(session, args.out, write_meta_graph=False))
    print(f"{len(assignments)} backbone variables from nsfwjs, {len(variables) - len(assignments)} "
          "head variables freshly initialised", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
