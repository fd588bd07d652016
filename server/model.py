"""The served model: a loaded model file plus what serving needs from it, and its forward pass.

A `ServedModel` is immutable; hot reload builds and warms a new one and swaps
the reference (see `Batcher.swap_model`). Everything a request needs from the
model (labels, input spec, build) is computed here once, not per call. Which
repository model and version it is, the model manager knows (`bitmoji.server.models`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch

from bitmoji.core.modelfile import LoadedModel, ModelFileError, optimize_for_inference
from bitmoji.core.preprocess import PREPROCESSING, to_model_input
from bitmoji.server.config import OPTIMIZE_MODES
from bitmoji.server.errors import Internal
from bitmoji.server.inputs import InputSpec

OPTIMIZED_TOLERANCE = 1e-4  # |logit difference| (absolute and relative) the optimized copy may show
AUTO_MIN_GAIN = 0.9  # auto: the optimized copy must take at most 0.9x the time at the largest batch...
AUTO_MAX_LOSS = 1.1  # ...and at most 1.1x at batch 1 (the lonely caller must not pay for it)
CHECK_BATCH_CAP = 32  # the check and the timing use at most this batch: start-up stays short with --max-batch-size 256


class ModelOutputError(Internal):
    """The model ran but returned something Classify cannot report."""


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """One line saying why the model failed: TorchScript's own error is the LAST line of its traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = (
        lines[-1] if lines[0].startswith("The following operation failed in the TorchScript interpreter") else lines[0]
    )
    line = line.removeprefix("builtins.")
    return (line if ":" in line else f"{type(exc).__name__}: {line}")[:limit]


def _image_size(metadata: dict, shape: tuple[int, ...] | None) -> tuple[int, int] | None:
    """The size images are resized to, if the model file says it takes images preprocessed as we do."""
    preprocessing = metadata.get("preprocessing")
    if not preprocessing:
        return None
    # Serving must equal training: refuse a file that asks for a preprocessing this server does not do.
    differs = {k: v for k, v in preprocessing.items() if k != "resize" and PREPROCESSING.get(k) != v}
    if differs:
        raise ModelFileError(f"the model file asks for preprocessing this server does not implement: {differs}")
    size = tuple(int(s) for s in preprocessing.get("resize") or (shape[-2:] if shape else ()))
    if len(size) != 2 or (shape is not None and (len(shape) != 3 or shape[0] != 3 or tuple(shape[-2:]) != size)):
        raise ModelFileError(f"image preprocessing (resize {list(size)}) does not match the input shape {shape}")
    return size


@dataclass(frozen=True)
class ServedModel:
    loaded: LoadedModel
    spec: InputSpec
    positive_label: str
    negative_label: str
    forward_module: torch.jit.ScriptModule | None = None  # what Classify runs, if not `loaded.module` (see `optimized`)

    @classmethod
    def create(cls, loaded: LoadedModel, *, max_pixels: int, input_shape: tuple[int, ...] | None = None) -> ServedModel:
        """Wrap a loaded file; `input_shape` is used only when the file declares none."""
        declared = loaded.input_shape
        shape = tuple(declared) if declared else input_shape
        spec = InputSpec(shape=shape, image_size=_image_size(loaded.metadata, shape), max_pixels=max_pixels)
        names = loaded.class_names or []
        positive = loaded.positive_class or ""
        if not positive and len(names) == 2:
            positive = names[loaded.metadata.get("positive_index", 1)]
        others = [n for n in names if n != positive]
        return cls(loaded, spec, positive, others[0] if others else "")

    @property
    def build(self) -> str:
        """The file's own identity: its metadata's model_version, or sha256-<12 hex digits>."""
        return self.loaded.version

    @property
    def architecture(self) -> str:
        return self.loaded.metadata.get("architecture") or ""

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def module(self):
        return self.loaded.module

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A CPU batch -> float32 model input on the model's device (uint8 travels as uint8: 4x less to copy)."""
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return to_model_input(batch) if batch.dtype == torch.uint8 else batch

    def predict(self, batch: torch.Tensor) -> list[list[float]]:
        """A batch [N, ...] (uint8 or float32, on CPU) -> one [logit, probability] per item."""
        module = self.module if self.forward_module is None else self.forward_module
        with torch.inference_mode():
            out = module(self.to_device(batch))
            if not isinstance(out, torch.Tensor):
                raise ModelOutputError(f"the model returned {type(out).__name__}, not a tensor")
            n = batch.shape[0]
            if out.dim() == 0 or out.shape[0] != n or out.numel() != n:
                raise ModelOutputError(
                    f"the model returned shape {list(out.shape)} for {n} items; Classify needs one logit per item"
                )
            logits = out.reshape(n).to(torch.float32)
            probabilities = torch.sigmoid(logits)
            both = torch.stack((logits, probabilities), 1).cpu()  # one device->host copy
        return both.tolist()

    def warmup(self, max_batch_size: int) -> list[int]:
        """Run zeros through the model at batch sizes 1, 2, 4, ... and max: first calls then run at full speed.

        Skipped (returns []) for a model that declares no input shape.
        """
        if self.spec.shape is None:
            return []
        sizes = sorted(
            {*(1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size), max_batch_size}
        )
        dtype = torch.uint8 if self.spec.image_size else torch.float32
        for size in sizes:
            self.predict(torch.zeros((size, *self.spec.shape), dtype=dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sizes

    def optimized(self, max_batch_size: int, mode: str = "auto") -> tuple[ServedModel, str]:
        """This model with Classify's forward pass run by a frozen, optimized copy when that pays; and why.

        GradientProbe keeps the module as loaded (a frozen copy has no parameters to take gradients of).
        The copy must give the same logits as the loaded module on a random batch; "on" serves it then,
        "auto" only if it is faster at `max_batch_size` (at most 32) and not slower at batch 1 (timed
        here, median of 3); "off", a model on CUDA (not measured there yet) or one without a declared input shape
        keep the module as loaded. Runs before the model serves (start-up warm-up, reload).
        """
        if mode not in OPTIMIZE_MODES:
            raise ValueError(f"optimize mode {mode!r}: choose from {', '.join(OPTIMIZE_MODES)}")
        if mode == "off":
            return self, "as loaded (--optimize off)"
        if self.device.type != "cpu" or self.spec.shape is None:
            return self, "as loaded (optimizing needs a CPU model that declares its input shape)"
        try:
            candidate = replace(self, forward_module=optimize_for_inference(self.module))
        except Exception as exc:  # a module torch cannot freeze still serves as loaded
            return self, f"as loaded (could not optimize: {error_summary(exc, 120)})"
        batch_size = min(max_batch_size, CHECK_BATCH_CAP)
        generator, shape = torch.Generator().manual_seed(0), (batch_size, *self.spec.shape)
        big = (
            torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
            if self.spec.image_size
            else torch.rand(shape, generator=generator)
        )
        want = torch.tensor([logit for logit, _p in self.predict(big)])  # a model that fails here fails its warm-up
        try:
            got = torch.tensor([logit for logit, _p in candidate.predict(big)])
        except Exception as exc:  # the copy, not the model, is broken: serve the model as loaded
            return self, f"as loaded (the optimized copy failed: {error_summary(exc, 120)})"
        difference = float((got - want).abs().max())
        if not torch.allclose(got, want, atol=OPTIMIZED_TOLERANCE, rtol=OPTIMIZED_TOLERANCE):
            return self, f"as loaded (the optimized copy's logits differ by up to {difference:.2g})"
        if mode == "on":
            return candidate, f"optimized (--optimize on; logits within {difference:.1g})"
        # the check above already ran both modules at the full batch: only batch 1 needs a first, untimed call
        times = {
            name: [_median_time(model.predict, big[:1]), _median_time(model.predict, big, warm=False)]
            for name, model in (("loaded", self), ("optimized", candidate))
        }
        (one, full), (opt_one, opt_full) = times["loaded"], times["optimized"]
        summary = (
            f"{1000 * opt_full:.1f} ms optimized vs {1000 * full:.1f} ms as loaded at batch {batch_size}, "
            f"{1000 * opt_one:.2f} vs {1000 * one:.2f} ms at batch 1"
        )
        if opt_full <= AUTO_MIN_GAIN * full and opt_one <= AUTO_MAX_LOSS * one:
            return candidate, f"optimized ({summary}; logits within {difference:.1g})"
        return self, f"as loaded (the optimized copy does not pay: {summary})"

    def label(self, probability: float) -> str:
        return self.positive_label if probability >= 0.5 else self.negative_label


def _median_time(function, *args, repeats: int = 3, warm: bool = True) -> float:
    if warm:
        function(*args)  # the first call of a TorchScript module at a new shape compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
