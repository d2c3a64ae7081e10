"""Compute precision: float32, or 16-bit compute over float32 variables (``--precision bf16``).

With ``bf16`` the network's convolutions, pools and batch norms run in a 16-bit type, and everything whose
precision matters stays float32:

- variables are created, updated and checkpointed as float32 and cast to the compute type where they are
  read (a variable-scope custom getter in :func:`finetune.model.build`), so a bf16 run writes the same
  checkpoint a fp32 run would, and frozen layers stay bit-identical;
- batch norm's offset and moving statistics stay float32: the fused kernel takes them so for 16-bit input,
  and slim creates them as float32 whatever the input type;
- logits are cast back to float32 before the softmax, the loss and the argmax.

Nothing else is kept in float32 for want of a kernel: with oneDNN (TensorFlow's default on x86 Linux) every
op of the network and of its gradient has a bfloat16 CPU kernel, fused batch norm and its gradient included.

Which 16-bit type:

- on a CPU, bfloat16. oneDNN runs it natively where the CPU has AVX-512 BF16 or AMX (``avx512_bf16`` or
  ``amx_bf16`` in /proc/cpuinfo); elsewhere it is emulated and slower than fp32, and a warning says so;
- on a GPU of compute capability 8.0 or newer (Ampere on), bfloat16;
- on an older GPU, float16, with dynamic loss scaling while training: float16's smallest normal number is
  about 6e-5, so small gradients would flush to zero; bfloat16 has float32's exponent range and needs none.

An exported ``.pb`` has its type frozen in: bf16 there always means bfloat16, recorded in its model.json.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from finetune.config import check_precision
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")

FLOAT32, BFLOAT16, FLOAT16 = "float32", "bfloat16", "float16"
# /proc/cpuinfo flags of CPUs with bfloat16 dot products: AVX-512 BF16 (Cooper Lake, Zen 4 on) and AMX.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# GPUs from this compute capability on (Ampere) have bfloat16 tensor cores; older ones get float16.
GPU_BF16_CAPABILITY = (8, 0)
# Tensor cores, and with them fast float16, arrived with compute capability 7.0 (Volta).
GPU_FP16_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class Compute:
    """A resolved precision: what was asked, the type the network computes in, and loss scaling."""

    precision: str  # "fp32" or "bf16", as asked
    dtype: str  # "float32", "bfloat16" or "float16"

    @property
    def loss_scaling(self) -> bool:
        """float16 training needs its loss scaled up so that small gradients survive; bfloat16 does not."""
        return self.dtype == FLOAT16


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU feature flags Linux reports, or None where there is no /proc/cpuinfo to read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 says flags, ARM says Features
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool | None:
    """True when the CPU multiplies bfloat16 natively; None when that cannot be told (no /proc/cpuinfo)."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return None
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def onednn_enabled() -> bool:
    """Whether TensorFlow's oneDNN kernels are on (the default on x86 Linux); bfloat16 needs them to be fast.

    Without oneDNN, bfloat16 convolutions fall back to generic kernels, measured here at about 17 times
    slower than with it.
    """
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false", "off")


def gpu_compute_capability() -> tuple[int, int] | None:
    """The lowest compute capability among the GPUs TensorFlow sees, or None without a GPU."""
    from finetune.compat import tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return min(capabilities) if capabilities else None


def _slow_bf16_reason(flag: str) -> str | None:
    """Why bfloat16 would be slow on this CPU, as a warning, or None when it runs natively."""
    if not onednn_enabled():
        return (
            f"{flag} bf16: TF_ENABLE_ONEDNN_OPTS turns oneDNN off, so bfloat16 runs on generic kernels, "
            "many times slower than fp32; unset it or use --precision fp32"
        )
    if cpu_has_bf16() is False:
        return (
            f"{flag} bf16: this CPU has no native bfloat16 ({' or '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo), "
            "so it is emulated and slower than fp32; use --precision fp32"
        )
    return None


def resolve(precision: str, *, gpu: bool | None = None, flag: str = "--precision") -> Compute:
    """Chooses the compute type for a precision on this machine and warns (once, here) when it will be slow.

    Args:
        precision: "fp32" or "bf16".
        gpu: whether the network runs on GPUs (then their compute capability decides the 16-bit type);
            None: whenever TensorFlow sees one, as with TensorFlow's default placement.
        flag: the flag the precision came from, for messages.
    """
    check_precision(precision, flag)
    if precision == "fp32":
        return Compute(precision, FLOAT32)
    capability = gpu_compute_capability() if gpu or gpu is None else None
    if capability is not None:
        if capability >= GPU_BF16_CAPABILITY:
            return Compute(precision, BFLOAT16)
        version = ".".join(map(str, capability))
        if capability < GPU_FP16_CAPABILITY:
            log.warning(
                f"{flag} bf16: this GPU (compute capability {version}) has neither bfloat16 nor tensor cores; "
                "float16 will not be faster than fp32; use --precision fp32"
            )
        else:
            log.info(f"{flag} bf16: this GPU (compute capability {version}) has no bfloat16; using float16 "
                     "with loss scaling")  # fmt: skip
        return Compute(precision, FLOAT16)
    reason = _slow_bf16_reason(flag)
    if reason:
        log.warning(reason)
    return Compute(precision, BFLOAT16)


def check_frozen_precision(frozen: str, requested: str | None, model_path: str, flag: str = "--precision") -> str:
    """Checks a .pb's recorded precision against the one a command was given; warns when it will be slow.

    Returns the .pb's precision.

    Raises:
        FinetuneError: the .pb was exported at another precision than ``requested``.
    """
    if requested is not None and check_precision(requested, flag) != frozen:
        raise FinetuneError(
            f"{flag} {requested}: {model_path} was exported at {frozen}, and a .pb runs at the precision "
            f"frozen into it; drop {flag}, or export again with `finetune export --precision {requested}`"
        )
    if frozen == "bf16" and gpu_compute_capability() is None:
        reason = _slow_bf16_reason(flag)
        if reason:
            log.warning(reason.replace(f"{flag} bf16:", f"{model_path} is a bf16 model:", 1))
    return frozen


def loss_scale_optimizer(optimizer, compute: Compute):
    """Wraps a tf.compat.v1 optimizer with dynamic loss scaling when the compute type needs it.

    The wrapper scales the loss before differentiating and unscales the gradients; a step whose gradients
    overflow is skipped and the scale halved. Unlike TensorFlow's own wrapper, the global step advances on
    every step, skipped or not, so that the trainer's step count, checkpoints and learning-rate schedule
    stay in step.
    """
    if not compute.loss_scaling:
        return optimizer
    from finetune.compat import tf

    class _LossScaleOptimizer(tf.compat.v1.mixed_precision.MixedPrecisionLossScaleOptimizer):
        def apply_gradients(self, grads_and_vars, global_step=None, name=None):
            applied = super().apply_gradients(grads_and_vars, name=name)
            if global_step is None:
                return applied
            with tf.control_dependencies([applied]):
                return tf.compat.v1.assign_add(global_step, 1).op

    return _LossScaleOptimizer(optimizer, tf.compat.v1.mixed_precision.DynamicLossScale())
