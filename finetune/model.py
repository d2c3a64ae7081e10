"""Slim's InceptionV3 for N classes: build it, name its layers, restore the pretrained part, train a subset.

Vocabulary: a *scope* is a variable-scope prefix such as ``InceptionV3/Mixed_7c``; a *preset* names a group
of them (``logits``, ``mixed_7``, ``mixed_6``, ``all``). The head is ``InceptionV3/Logits`` and
``InceptionV3/AuxLogits``.

Layers outside the scopes being trained run in inference mode: their batch norm normalises with the moving
statistics and never updates them, and dropout is off unless the Logits scope is trained. slim's own trainer
runs every layer with ``is_training=True``, so frozen layers' statistics drift toward the new data; here they
stay bit-identical to the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from finetune.compat import inception, slim, tf
from finetune.errors import CheckpointError, FinetuneError, ScopeError

# The network's names and limits live in finetune/network.py (no TensorFlow there, so config.py's help text
# reads them too); imported here so that model.ROOT, model.PRESETS and the rest keep working.
from finetune.network import (  # noqa: F401
    AUX_SCOPE,
    BLOCKS,
    CHECKPOINT_CLASSES,
    DEFAULT_IMAGE_SIZE,
    FEATURE_SIZE,
    HEAD_SCOPES,
    LOGITS_SCOPE,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    PRESETS,
    ROOT,
    SCOPES,
)
from finetune.rundir import newest_checkpoint

# Name of the collection that holds batch-norm moving-statistics updates of the layers being trained. Any name
# but tf.GraphKeys.UPDATE_OPS keeps slim.batch_norm on its fused path (see finetune/compat.py); the train op
# must run these ops.
BATCH_NORM_UPDATES = "finetune_batch_norm_updates"
_POOL_OUTPUTS = "finetune_avg_pool_outputs"
# The logits layer's bias: its presence marks a checkpoint with a head, its length is the class count.
_LOGITS_BIAS = f"{LOGITS_SCOPE}/Conv2d_1c_1x1/biases"
_FIRST_WEIGHTS = f"{ROOT}/Conv2d_1a_3x3/weights"


# --------------------------------------------------------------------------------------------------- scopes


def resolve_scopes(value: str, flag: str) -> tuple[str, ...]:
    """Turns a preset name or a comma-separated list of presets and scopes into scope names.

    Scopes may be written in full (``InceptionV3/Mixed_7c``) or without the root (``Mixed_7c``);
    ``none`` or an empty string gives no scopes.

    Raises:
        ScopeError: a name is neither a preset nor a scope; the message lists the valid names.
    """
    scopes: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if not item or item == "none":
            continue
        if item in PRESETS:
            found = PRESETS[item]
        elif item == ROOT or item in SCOPES:
            found = (item,)
        elif f"{ROOT}/{item}" in SCOPES:
            found = (f"{ROOT}/{item}",)
        else:
            raise ScopeError(
                f"{flag}: unknown scope {item!r}; use a preset ({', '.join(PRESETS)}) or comma-separated "
                f"scopes from: {', '.join(block for block in BLOCKS)} (with or without the '{ROOT}/' prefix)"
            )
        scopes.extend(scope for scope in found if scope not in scopes)
    return tuple(scopes)


def in_scopes(name: str, scopes: Iterable[str]) -> bool:
    """True when a variable or op name lies under one of the scopes (a whole path component match)."""
    return any(name == scope or name.startswith(scope + "/") for scope in scopes)


def scope_of(name: str) -> str:
    """The block scope a variable belongs to, e.g. ``InceptionV3/Mixed_7c``; the name itself if none."""
    return next((scope for scope in SCOPES if in_scopes(name, (scope,))), name)


# ----------------------------------------------------------------------------------------------- image size


def _valid(size: int, kernel: int, stride: int = 1) -> int:
    return (size - kernel) // stride + 1


def feature_map_sizes(image_size: int) -> tuple[int, int]:
    """Spatial sizes of Mixed_6e and Mixed_7c for a square input (slim's VALID convs and pools)."""
    size = _valid(image_size, 3, 2)  # Conv2d_1a_3x3
    size = _valid(size, 3)  # Conv2d_2a_3x3
    size = _valid(size, 3, 2)  # MaxPool_3a_3x3
    size = _valid(size, 3)  # Conv2d_4a_3x3
    size = _valid(size, 3, 2)  # MaxPool_5a_3x3
    mixed_6 = _valid(size, 3, 2)  # Mixed_6a
    return mixed_6, _valid(mixed_6, 3, 2)  # Mixed_7a


def aux_head_fits(image_size: int) -> bool:
    """Whether slim's aux head can be built: its fixed 5x5/3 pool needs Mixed_6e to be 5x5 or more.

    That is 107 pixels and up; every size up to MAX_IMAGE_SIZE then gives 1x1 aux logits.
    """
    mixed_6, _ = feature_map_sizes(image_size)
    return mixed_6 >= 5


def check_image_size(image_size: int, flag: str = "--image-size") -> None:
    """Raises FinetuneError for an image size the network cannot take."""
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise FinetuneError(
            f"{flag} {image_size} is out of range: slim's InceptionV3 takes {MIN_IMAGE_SIZE} to "
            f"{MAX_IMAGE_SIZE} pixels; use {DEFAULT_IMAGE_SIZE}, the size it was pretrained at, unless "
            "you need speed (smaller) more than accuracy"
        )


# ------------------------------------------------------------------------------------------------ the graph


@dataclass(frozen=True)
class Network:
    """The tensors of one InceptionV3 built for N classes."""

    logits: tf.Tensor  # [batch, classes]
    probabilities: tf.Tensor  # softmax of logits
    features: tf.Tensor  # [batch, 2048], the final average pool, which feeds dropout and the Logits layer
    aux_logits: tf.Tensor | None  # [batch, classes] when the aux head was built, else None
    end_points: dict


def build(
    images: tf.Tensor,
    num_classes: int,
    *,
    train_scopes: Sequence[str] = (),
    dropout_keep_prob: float = 0.8,
    aux_logits: bool = True,
    reuse: bool | None = None,
    compute_dtype: str = "float32",
    restored: bool = False,
    values_from: Checkpoint | None = None,
) -> Network:
    """Builds slim's InceptionV3 on ``images`` ([batch, S, S, 3] in [-1, 1]) in the current graph.

    Args:
        images: a float tensor with a static square spatial size of at least 75.
        num_classes: width of the new head.
        train_scopes: scopes whose layers run in training mode (batch statistics, moving averages updated
            through BATCH_NORM_UPDATES, dropout under Logits). Empty builds the inference graph.
        dropout_keep_prob: keep probability of the dropout before Logits while it trains (slim's 0.8).
        aux_logits: build the aux head when it is being trained and the image size allows it.
        reuse: reuse the variables of an earlier build (a second tower, an eval graph beside training).
        compute_dtype: "float32", or "bfloat16" / "float16" for mixed precision: the images and every
            weight are cast to it where they are read, while variables stay float32 and logits, aux logits,
            features and probabilities come out float32 (see finetune/precision.py); ``end_points`` stay in
            the compute type.
        restored: every variable that is read will be loaded from a checkpoint first (evaluate, feature
            extraction, Grad-CAM): see _restored_variables.
        values_from: a graph with no variables: every weight is a constant holding this checkpoint's value
            (its moving average where it has one, as restore loads), named as the variable would be. Export
            freezes the network this way. Checked as restore checks.

    Raises:
        CheckpointError: with ``values_from``, as restore raises it.
    """
    size = _checked_size(images, num_classes)
    if restored and values_from is not None:
        raise ValueError("restored and values_from exclude each other: a graph of constants restores nothing")
    train_scopes = tuple(train_scopes)
    with_aux = (
        aux_logits and in_scopes(AUX_SCOPE, train_scopes) and aux_head_fits(size)
    )

    def batch_norm(inputs, **params):
        # Called by slim.conv2d inside the conv's variable scope, so the scope says which block this is.
        # An explicit is_training overrides the one inception_v3 sets for every layer through arg_scope.
        layer = tf.compat.v1.get_variable_scope().name
        params["is_training"] = in_scopes(layer, train_scopes)
        return slim.batch_norm(inputs, **params)

    arg_scope = inception.inception_v3_arg_scope(
        weight_decay=0.0,  # decay is added by the trainer, on trained weights only
        updates_collections=BATCH_NORM_UPDATES,
    )
    # slim's PreLogits end point is taken after dropout; the features are the final pool's output, which
    # only slim's outputs collection exposes. Each build adds its pools; this build's are the new ones.
    pools = tf.compat.v1.get_collection_ref(_POOL_OUTPUTS)
    first_new_pool = len(pools)
    dtype = tf.as_dtype(compute_dtype)
    with slim.arg_scope(arg_scope), slim.arg_scope([slim.conv2d], normalizer_fn=batch_norm), slim.arg_scope(
        [slim.avg_pool2d], outputs_collections=_POOL_OUTPUTS
    ), _checkpoint_values(values_from) as unrestorable, _float32_variables(dtype), (
        _restored_variables() if restored else contextlib.nullcontext()
    ):
        logits, end_points = inception.inception_v3(
            tf.cast(images, dtype) if images.dtype != dtype else images,
            num_classes=num_classes,
            # Only dropout still reads this: batch norm takes its mode from the wrapper above.
            is_training=in_scopes(LOGITS_SCOPE, train_scopes),
            dropout_keep_prob=dropout_keep_prob,
            create_aux_logits=with_aux,
            reuse=reuse,
        )
    if unrestorable:
        raise CheckpointError(_restore_problem(unrestorable, values_from, "--checkpoint"))
    final_pool = next(
        p for p in pools[first_new_pool:] if any("/Logits/AvgPool_1a" in a for a in p.aliases)
    )
    return _network(logits, end_points, final_pool, dtype)


def _checked_size(images: tf.Tensor, num_classes: int) -> int:
    """The images' spatial size, after refusing a size or class count the network cannot take."""
    size = images.shape[1]
    if size is None or images.shape[2] != size:
        raise ValueError(f"images must have a static square spatial size, got {images.shape}")
    check_image_size(size, flag="image size")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return size


def _network(logits: tf.Tensor, end_points: dict, final_pool: tf.Tensor, dtype: tf.DType) -> Network:
    """The build's outputs, in float32 whatever the compute type."""
    if dtype == tf.float32:
        return Network(
            logits=logits,
            probabilities=end_points["Predictions"],
            features=tf.squeeze(final_pool, [1, 2], name="Features"),
            aux_logits=end_points.get("AuxLogits"),
            end_points=end_points,
        )
    # Softmax, loss and argmax in float32: bfloat16 keeps 8 bits of mantissa, too few to rank close classes.
    logits = tf.cast(logits, tf.float32, name="Logits_float32")
    aux = end_points.get("AuxLogits")
    return Network(
        logits=logits,
        probabilities=tf.nn.softmax(logits, name="Predictions_float32"),
        features=tf.cast(tf.squeeze(final_pool, [1, 2]), tf.float32, name="Features"),
        aux_logits=None if aux is None else tf.cast(aux, tf.float32, name="AuxLogits_float32"),
        end_points=end_points,
    )


def _restored_variables():
    """A variable scope whose new variables start from a placeholder instead of slim's initialisers, for a
    graph that restores every variable before reading it.

    slim's initialisers (random draws for the weights, constants for batch norm) are ops built for every
    variable and never run when a checkpoint fills it: about a fifth of an inference build (measured: 1.5 s
    -> 1.2 s at 75 px). A placeholder is one op, and a variable that somehow escaped the restore fails loudly
    ("You must feed a value for placeholder") instead of handing out random weights.
    """

    def from_checkpoint(shape, dtype=tf.float32, partition_info=None):
        return tf.compat.v1.placeholder(dtype, shape, name="restored_from_checkpoint")

    def getter(next_getter, name, *args, **kwargs):
        return next_getter(name, *args, **{**kwargs, "initializer": from_checkpoint})

    return _getter_scope(getter)


@contextlib.contextmanager
def _checkpoint_values(checkpoint: Checkpoint | None):
    """A variable scope in which each variable asked for is, instead, a constant of the checkpoint's value;
    yields the list of (name, shape) the checkpoint cannot fill, which build raises as restore would.

    Reading the values while building, instead of building variables, restoring them and converting them to
    constants, freezes the network in 1.2 s instead of 2.7 s at 75 px (the same GraphDef minus the variables'
    read ops, the same outputs). Outermost of build's getters: the others (the 16-bit cast) wrap what it gives.
    """
    if checkpoint is None:
        yield []
        return
    reader = tf.compat.v1.train.NewCheckpointReader(checkpoint.path)
    unrestorable: list[tuple[str, list[int]]] = []

    def getter(next_getter, name, *args, shape=None, dtype=tf.float32, **kwargs):
        shape, dtype = tf.TensorShape(shape).as_list(), tf.as_dtype(dtype).base_dtype
        source = f"{name}/{AVERAGE_SUFFIX}" if f"{name}/{AVERAGE_SUFFIX}" in checkpoint.shapes else name
        if checkpoint.shapes.get(source) != shape:
            unrestorable.append((source, shape))
            return tf.zeros(shape, dtype)
        try:
            value = reader.get_tensor(source)
        except (tf.errors.OpError, ValueError, IndexError):  # a truncated or damaged data file
            raise CheckpointError(damaged_checkpoint(checkpoint.path) or
                                  f"--checkpoint {checkpoint.path}: {source} cannot be read; "
                                  f"{DAMAGED_CHECKPOINT_FIX}") from None  # fmt: skip
        scope, _, base = name.rpartition("/")
        # The variable's own name (a trailing "/" makes the scope absolute), not the ops' nested scope.
        with tf.compat.v1.get_default_graph().name_scope(f"{scope}/"):
            return tf.constant(value, dtype=dtype, name=base)

    with _getter_scope(getter):
        yield unrestorable


def _float32_variables(dtype: tf.DType):
    """A variable scope in which weights asked for in ``dtype`` are float32 variables, read through a cast.

    slim asks for conv weights and biases in the input's type; they are created (and saved, restored and
    updated) as float32 and cast where they are read, so only the compute is 16-bit. Batch norm's variables
    are asked for as float32 by slim itself and pass through unchanged.
    """
    if dtype == tf.float32:
        return contextlib.nullcontext()

    def getter(next_getter, name, *args, **kwargs):
        wanted = kwargs.get("dtype")
        if wanted is None or wanted.base_dtype not in (tf.bfloat16, tf.float16):
            return next_getter(name, *args, **kwargs)
        variable = next_getter(name, *args, **{**kwargs, "dtype": tf.float32})
        return tf.cast(variable, wanted.base_dtype)

    return _getter_scope(getter)


def _getter_scope(getter):
    """The current variable scope again, with ``getter`` added to its custom getters; no new name scope, so
    op names (``tower_0/...``) and reuse stay as they were."""
    return tf.compat.v1.variable_scope(tf.compat.v1.get_variable_scope(), custom_getter=getter,
                                       auxiliary_name_scope=False)  # fmt: skip


# The convolutions of an inference copy (no aux head), in build order: see create_variables.
_LAYERS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inception_v3_layers.json")


def create_variables(num_classes: int) -> None:
    """Creates the variables ``build(images, num_classes)`` creates for an inference copy (no aux head), with
    the same names, shapes, trainability and collections, but none of the layers: every variable starts at
    zero and there is no operation that reads it.

    For a graph that holds the network only to restore it and save it whole, where every value comes from a
    checkpoint or is set on purpose: the head trained on cached features. Building the layers there took
    1.4 s at 75 px, these variables alone 0.7 s (scripts/bench_graph_build.py). The layers' shapes are in
    inception_v3_layers.json (written from a build; tests/test_model.py checks the two agree).
    """
    import json

    with open(_LAYERS_FILE, encoding="utf-8") as file:
        convolutions = json.load(file)["convolutions"]
    zeros = tf.compat.v1.zeros_initializer()

    def variable(scope: str, name: str, shape: list, trainable: bool = True) -> None:
        with tf.compat.v1.variable_scope(scope, auxiliary_name_scope=False):
            slim.model_variable(name, shape=shape, initializer=zeros, trainable=trainable,
                                collections=None if trainable else ["moving_vars"])  # fmt: skip

    for name, shape in convolutions:
        scope = f"{ROOT}/{name}"
        variable(scope, "weights", shape)
        for statistic in ("beta", "moving_mean", "moving_variance"):
            variable(f"{scope}/BatchNorm", statistic, shape[-1:], trainable=statistic == "beta")
    variable(f"{LOGITS_SCOPE}/Conv2d_1c_1x1", "weights", [1, 1, FEATURE_SIZE, num_classes])
    variable(f"{LOGITS_SCOPE}/Conv2d_1c_1x1", "biases", [num_classes])


def model_variables() -> list[tf.Variable]:
    """All variables of the network in the current graph, batch-norm moving statistics included."""
    return list(slim.get_model_variables())


def trainable_variables(scopes: Sequence[str]) -> list[tf.Variable]:
    """The variables an optimizer should update for these scopes (weights, biases, batch-norm betas)."""
    return [v for v in tf.compat.v1.trainable_variables() if in_scopes(v.op.name, scopes)]


def parameter_count(variables: Iterable[tf.Variable]) -> int:
    return sum(int(v.shape.num_elements()) for v in variables)


def classification_loss(
    logits: tf.Tensor,
    labels: tf.Tensor,
    num_classes: int,
    *,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
) -> tf.Tensor:
    """Mean softmax cross-entropy of a batch, each example weighed by its class's weight when given.

    The one loss of every path: the network's towers, the cached head and the learning-rate search, so a
    rate chosen by the search is chosen for the loss the run then minimises.
    """
    weights = 1.0
    if class_weights:
        weights = tf.gather(tf.constant(class_weights, tf.float32), labels)
    return tf.compat.v1.losses.softmax_cross_entropy(
        tf.one_hot(labels, num_classes), logits, weights=weights, label_smoothing=label_smoothing,
        loss_collection=None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A readable InceptionV3 checkpoint: its prefix for Saver.restore and its variable shapes."""

    path: str
    shapes: dict[str, list[int]]

    @property
    def num_classes(self) -> int | None:
        shape = self.shapes.get(_LOGITS_BIAS)
        return shape[0] if shape else None


def _checkpoint_prefix(path: str, flag: str) -> str:
    """Finds the checkpoint a path means: a V1 file, a V2 prefix (or one of its files), or a folder."""
    if os.path.isdir(path):
        latest = newest_checkpoint(path)
        if latest:
            return latest
        singles = sorted(name for name in os.listdir(path) if name.endswith(".ckpt"))
        if len(singles) == 1:
            return os.path.join(path, singles[0])
        raise CheckpointError(
            f"{flag} {path}: the folder holds no checkpoint; pass a .ckpt file, a train dir with "
            "checkpoints, or run `finetune download` to fetch the pretrained one"
        )
    for suffix in (".index", ".meta"):
        if path.endswith(suffix) and os.path.exists(path[: -len(suffix)] + ".index"):
            return path[: -len(suffix)]
    if ".data-" in path and os.path.exists(path.split(".data-")[0] + ".index"):
        return path.split(".data-")[0]
    if os.path.isfile(path) or os.path.exists(path + ".index"):
        return path
    raise CheckpointError(
        f"{flag} {path}: no such checkpoint; run `finetune download` to fetch the pretrained one, "
        "or pass the path of a .ckpt file or a train dir"
    )


DAMAGED_CHECKPOINT_FIX = (
    "pass another checkpoint with --checkpoint (an earlier step of the run, or the pretrained one: "
    "`finetune download --force` fetches it again)"
)


def damaged_checkpoint(prefix: str) -> str | None:
    """The error for a checkpoint that cannot be read whole (a truncated .index or .data): "checkpoint PREFIX
    is damaged (why); pass another ...", or None when every tensor reads.

    Reads every tensor, so it is run once a restore has already failed, to name the file to the user.
    """
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, ValueError, IndexError) as exc:  # IndexError: "Read less bytes than requested"
        reason = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
        return f"checkpoint {prefix} is damaged ({reason}); {DAMAGED_CHECKPOINT_FIX}"
    return None


def open_checkpoint(path: str | os.PathLike, flag: str = "--checkpoint") -> Checkpoint:
    """Reads a checkpoint's variable shapes (V1 single file or V2), checking that it is an InceptionV3 one.

    Raises:
        CheckpointError: missing, unreadable, or not an InceptionV3 checkpoint.
    """
    prefix = _checkpoint_prefix(os.fspath(path), flag)
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    except (tf.errors.OpError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{flag} {prefix}: not a readable TensorFlow checkpoint ({reason}); {DAMAGED_CHECKPOINT_FIX}"
        ) from None
    shapes = reader.get_variable_to_shape_map()
    if _FIRST_WEIGHTS not in shapes:
        raise CheckpointError(
            f"{flag} {prefix}: a TensorFlow checkpoint, but not of slim's InceptionV3 (no {_FIRST_WEIGHTS}); "
            "pass inception_v3.ckpt from `finetune download` or a finetune train dir"
        )
    return Checkpoint(path=prefix, shapes=shapes)


def default_exclusions(num_classes: int, checkpoint: Checkpoint) -> tuple[str, ...]:
    """The scopes not to restore when the user names none: the head, unless its class count matches.

    Even then, a head scope the checkpoint does not hold starts fresh: a head trained on cached features
    has no aux head, and a second phase that trains deeper layers builds one.
    """
    if checkpoint.num_classes != num_classes:
        return HEAD_SCOPES
    return tuple(scope for scope in HEAD_SCOPES if not any(in_scopes(name, (scope,)) for name in checkpoint.shapes))


def variables_to_restore(exclude_scopes: Sequence[str] = ()) -> list[tf.Variable]:
    """Model variables outside the excluded scopes; never optimizer slots or the global step."""
    return [v for v in model_variables() if not in_scopes(v.op.name, exclude_scopes)]


def check_restorable(
    variables: Sequence[tf.Variable], checkpoint: Checkpoint, flag: str = "--exclude"
) -> None:
    """Checks every variable against the checkpoint before anything is restored.

    Raises:
        CheckpointError: naming the first variable that is missing or has another shape, both shapes,
            how many more there are, and the flag that leaves them out of the restore.
    """
    shapes = [(v.op.name, v.shape.as_list()) for v in variables]
    wrong = [(name, shape) for name, shape in shapes if checkpoint.shapes.get(name) != shape]
    if wrong:
        raise CheckpointError(_restore_problem(wrong, checkpoint, flag))


def _restore_problem(wrong: Sequence[tuple[str, list[int]]], checkpoint: Checkpoint, flag: str) -> str:
    """The error for variables (name, shape) the checkpoint lacks or holds at another shape: the first of
    them, how many more, and the fix: --exclude their scopes (train), or another --checkpoint."""
    name, model_shape = wrong[0]
    if name not in checkpoint.shapes:
        first = f"{name} {model_shape} is not in checkpoint {checkpoint.path}"
    else:
        first = (f"{name} has shape {model_shape} in the model but {checkpoint.shapes[name]} in checkpoint "
                 f"{checkpoint.path}")  # fmt: skip
    scopes = sorted({scope_of(name) for name, _ in wrong}, key=SCOPES.index)
    others = len(wrong) - 1
    more = f" (and {others} more variable{'s' if others > 1 else ''})" if others else ""
    if flag != "--exclude":  # evaluate, export: every variable must come from the checkpoint
        return f"{first}{more}; pass {flag} a checkpoint of this model (one of its train dir's steps)"
    return f"{first}{more}; to initialise them fresh instead of restoring, pass {flag} {','.join(scopes)}"


def initialise_all_but(session: tf.compat.v1.Session, restored: Sequence[tf.Variable]) -> None:
    """Initialises every global variable except those a restore is about to fill.

    Running the initialisers of weights that the checkpoint then overwrites is wasted start-up: 0.4 to 0.7 s
    of a training graph's on this machine (`--trainable all` and `logits` at 299, fed from TFRecords).
    """
    skip = {v.op.name for v in restored}
    session.run(tf.compat.v1.variables_initializer(
        [v for v in tf.compat.v1.global_variables() if v.op.name not in skip]))  # fmt: skip


# tf.compat.v1.train.ExponentialMovingAverage's name for a variable's average: ``<variable>/<this>``.
AVERAGE_SUFFIX = "ExponentialMovingAverage"


def average_name(variable: tf.Variable) -> str:
    return f"{variable.op.name}/{AVERAGE_SUFFIX}"


def names_to_restore(variables: Sequence[tf.Variable], checkpoint: Checkpoint) -> dict[str, tf.Variable]:
    """What each variable is loaded from: its moving average where the checkpoint holds one (a run trained
    with ``--ema``), else its own value. Evaluate, export and a run built on another use the averages."""
    return {(average_name(v) if average_name(v) in checkpoint.shapes else v.op.name): v for v in variables}


def holds_averages(checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint holds moving averages of its weights (``--ema``)."""
    return any(name.endswith(f"/{AVERAGE_SUFFIX}") for name in checkpoint.shapes)


def restore(
    session: tf.compat.v1.Session, variables: Sequence[tf.Variable], checkpoint: Checkpoint, flag: str = "--exclude"
) -> None:
    """Loads the variables' values (their moving averages where the checkpoint has them) from the checkpoint,
    checked first with check_restorable. The one restore of the network from a checkpoint: a run's start
    (from the pretrained or an earlier run's weights), feature extraction, evaluate and Grad-CAM. A resumed
    run reloads its own checkpoint whole (optimizer slots and step too) through its own Saver; export reads
    the values into constants instead (build's ``values_from``).

    ``flag`` is what a mismatch tells the user to pass: train's ``--exclude`` leaves layers out of the
    restore; where every variable must come from the checkpoint (evaluate, Grad-CAM), ``--checkpoint``.

    Raises:
        CheckpointError: a variable the checkpoint lacks or holds at another shape, or a checkpoint whose
            files cannot be read (truncated, damaged).
    """
    check_restorable(variables, checkpoint, flag)
    if not variables:
        return
    saver = tf.compat.v1.train.Saver(var_list=names_to_restore(variables, checkpoint), write_version=2)
    try:
        saver.restore(session, checkpoint.path)
    except tf.errors.OpError as exc:
        damaged = damaged_checkpoint(checkpoint.path)  # which file is wrong and why, read tensor by tensor
        if damaged:
            raise CheckpointError(damaged) from None
        raise CheckpointError(
            f"--checkpoint {checkpoint.path}: restoring failed ({exc.message.splitlines()[0]}); "
            f"the file may be damaged: {DAMAGED_CHECKPOINT_FIX}"
        ) from None
