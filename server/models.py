"""The model manager: which model versions are loaded, in what state, and where a call goes.

Every version of every model in the repository has a state (Triton's names):
UNAVAILABLE (on disk, not loaded), LOADING, READY, UNLOADING, FAILED. A
version is served only once it is READY: it was loaded, verified (a forward
pass on zeros gives one finite logit per item), optimized as `--optimize`
says, and warmed up at every batch size, on a worker thread beside the
versions that keep serving; only then does it get its own batcher and take
calls. A version that fails any of that is FAILED, says why, and replaces
nothing. Unloading a version first stops routing new calls to it, then waits
for the calls it had accepted (none is lost), then stops its batcher.

Routing, for a call that names a model (or none: the default model) and a
version (or none):
- a named version must be READY (NOT_FOUND names the ones that are);
- otherwise the model's default version: pinned (config.json's
  `default_version`, or `SetDefaultVersion`), else the highest READY one;
  a canary takes `canary_weight` of those calls; a shadow version runs the
  same items off the caller's path (see `bitmoji.server.engine`).
Routes are recomputed on every state change, so the hot path is two dict
lookups.

Control modes (Triton's): `none` loads what the repository's version policies
select at start; `poll` also rescans every `--repository-poll-s` seconds (new
versions are loaded, removed ones unloaded, changed files reloaded in place);
`explicit` loads only the models named by `--load-model` and management calls.
A file replaced in place is reloaded beside the serving model and swapped in
between batches, if it takes the same inputs and names the same classes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitmoji.core.modelfile import ModelFileError, load_model
from bitmoji.server import repository
from bitmoji.server.batcher import Batcher
from bitmoji.server.config import ServerConfig
from bitmoji.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from bitmoji.server.metrics import LOAD_FAILED, LOAD_OK, Metrics, VersionMetrics, rss_bytes
from bitmoji.server.model import ServedModel, error_summary
from bitmoji.server.repository import ModelSource, RepositoryError

log = logging.getLogger("bitmoji-serve")

CONTROL_MODES = ("none", "poll", "explicit")
SETTLE_S = 0.5  # a changed file must stand still this long before it is loaded (a copy in progress)


class State(enum.Enum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


class ReloadRefused(Exception):
    """A new file cannot replace the served one in place; the message says why."""


def file_stamp(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns), or None while the file is missing: a change means a new file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_compatible(old: ServedModel, new: ServedModel) -> None:
    """An in-place reload must take the same inputs and name the same classes as the model it replaces."""
    if new.spec.shape != old.spec.shape:
        raise ReloadRefused(
            f"input shape {_shape(new.spec.shape)} differs from the served model's {_shape(old.spec.shape)}"
        )
    if new.spec.image_size != old.spec.image_size:
        raise ReloadRefused(f"image size {new.spec.image_size} differs from the served model's {old.spec.image_size}")
    if (new.loaded.class_names or []) != (old.loaded.class_names or []) or new.positive_label != old.positive_label:
        raise ReloadRefused(
            f"classes {new.loaded.class_names} (positive {new.positive_label!r}) differ from the served model's "
            f"{old.loaded.class_names} (positive {old.positive_label!r})"
        )


def check_forward(model: ServedModel) -> None:
    """Zeros in, one finite logit per item out (skipped for a model without a known input shape)."""
    if model.spec.shape is None:
        return
    dtype = torch.uint8 if model.spec.image_size else torch.float32
    results = model.predict(torch.zeros((2, *model.spec.shape), dtype=dtype))  # raises on a wrong output shape
    if not all(math.isfinite(logit) for logit, _ in results):
        raise ModelFileError("the model gives non-finite outputs on zeros")


def _shape(shape) -> str:
    return "undeclared" if shape is None else str(list(shape))


@dataclass(frozen=True)
class Batching:
    """How one model's versions are batched: the server's flags, overridden by its config.json."""

    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    model_threads: int


@dataclass
class LoadedVersion:
    """A READY (or UNLOADING) version: its batcher (which holds the served model) and its bookkeeping."""

    model: str
    version: int
    path: Path
    batcher: Batcher
    metrics: VersionMetrics
    batching: Batching
    stamp: tuple[int, int, int] | None
    memory_bytes: int
    forward: str  # which module Classify runs, and why (see ServedModel.optimized)
    active: int = 0  # calls routed here and not yet answered: what an unload waits for

    @property
    def served(self) -> ServedModel:
        return self.batcher.model

    @property
    def label(self) -> str:
        return str(self.version)


@dataclass
class VersionSlot:
    version: int
    state: State = State.UNAVAILABLE
    reason: str = ""
    loaded: LoadedVersion | None = None
    failed_stamp: tuple[int, int, int] | None = None  # the file a failed load tried: not retried until it changes


@dataclass
class Route:
    """Where calls that name no version go (recomputed on every change)."""

    default: LoadedVersion | None = None
    canary: LoadedVersion | None = None
    canary_weight: float = 0.0
    shadow: LoadedVersion | None = None


@dataclass
class ModelEntry:
    name: str
    source: ModelSource | None
    slots: dict[int, VersionSlot] = field(default_factory=dict)
    pinned: int | None = None  # SetDefaultVersion / config.json default_version
    previous_default: int | None = None
    canary: int | None = None
    canary_weight: float = 0.0
    shadow: int | None = None
    wanted: bool = True  # explicit mode: loaded by request (False after UnloadModel)
    selected: set[int] | None = None  # the versions LoadModel/UnloadModel named (None: the version policy's)
    route: Route = field(default_factory=Route)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def ready(self) -> list[LoadedVersion]:
        return [s.loaded for _, s in sorted(self.slots.items()) if s.state is State.READY and s.loaded is not None]

    def default_version(self) -> LoadedVersion | None:
        ready = {v.version: v for v in self.ready()}
        if self.pinned in ready:
            return ready[self.pinned]
        return ready[max(ready)] if ready else None

    def recompute_route(self) -> None:
        ready = {v.version: v for v in self.ready()}
        default = self.default_version()
        canary = ready.get(self.canary) if self.canary is not None else None
        shadow = ready.get(self.shadow) if self.shadow is not None else None
        self.route = Route(
            default=default,
            canary=canary if canary is not default else None,
            canary_weight=self.canary_weight,
            shadow=shadow if shadow is not default else None,
        )


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: State
    reason: str
    build: str
    architecture: str
    memory_bytes: int


@dataclass(frozen=True)
class ModelStatus:
    """A model's versions with their states, and where calls go: what management calls and GetModelInfo show."""

    name: str
    versions: list[VersionStatus]
    default_version: int | None
    pinned: bool
    previous_default: int | None
    canary_version: int | None
    canary_weight: float
    shadow_version: int | None


class ModelManager:
    """Loads, unloads, reloads and routes the repository's model versions (state changes happen on the loop)."""

    def __init__(
        self,
        config: ServerConfig,
        metrics: Metrics,
        device: torch.device,
        *,
        torch_threads: int,
        on_change: Callable[[str], None] = lambda name: None,
    ):
        self._config = config
        self._metrics = metrics
        self._device = device
        self._torch_threads = torch_threads
        self._on_change = on_change
        self._models: dict[str, ModelEntry] = {}
        self._model_file = config.model or ""  # --model (when no --model-repository)
        self._load_lock = asyncio.Lock()  # one load at a time: memory deltas stay attributable, CPU stays for serving
        # every version's batcher takes a slot per running batch: the model threads of all loaded versions
        # together run at most this many batches at once (one per model thread of the server's default)
        self._slots = threading.Semaphore(config.resolved_decode_workers)
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self.default_model: str | None = None

    # -- the repository -----------------------------------------------------------

    def _scan(self) -> dict[str, ModelSource]:
        config = self._config
        if config.model_repository:
            return repository.scan(config.model_repository)
        return repository.single_file(self._model_file, config.model_name)

    async def start(self) -> None:
        """Read the repository and load what the control mode says (raises RepositoryError for a bad folder)."""
        sources = await asyncio.to_thread(self._scan)
        config = self._config
        explicit = set(config.load_model)
        missing = explicit - set(sources) - {"*"}
        if missing:
            raise RepositoryError(
                f"--load-model {', '.join(sorted(missing))}: not in the repository "
                f"(it has {', '.join(sources) or 'nothing'})"
            )
        self.default_model = config.default_model or (next(iter(sources)) if len(sources) == 1 else None)
        if self.default_model is not None and self.default_model not in sources:
            raise RepositoryError(f"--default-model {self.default_model}: not in the repository")
        self._refresh(sources, "start")
        for entry in list(self._models.values()):
            await self._apply(entry)

    def _refresh(self, sources: dict[str, ModelSource], trigger: str) -> None:
        """Take a fresh scan: new models and versions get entries (nothing is loaded or unloaded here)."""
        explicit = self._config.model_control_mode == "explicit"
        for name, source in sources.items():
            entry = self._models.get(name)
            if entry is None:
                entry = self._models[name] = ModelEntry(name, source)
                _route_from_config(entry, source.config)
                self._metrics.model_seen(name)
                entry.wanted = not explicit or "*" in self._config.load_model or name in self._config.load_model
                if trigger != "start":
                    log.info(
                        "model repository %s: new model %s (versions %s)", trigger, name, _versions(source.versions)
                    )
            else:
                if entry.source is not None and _routing(source.config) != _routing(entry.source.config):
                    _route_from_config(entry, source.config)  # config.json's routing changed: it wins
                    log.info("model repository %s: %s's routing from config.json", trigger, name)
                entry.source = source
            for version in source.versions:
                entry.slots.setdefault(version, VersionSlot(version))
        for name, entry in self._models.items():
            if name not in sources and entry.source is not None:
                entry.source = None
                log.info("model repository %s: model %s was removed", trigger, name)

    async def poll(self, trigger: str = "poll") -> None:
        """Rescan: load new models and versions, unload removed ones, reload changed files in place."""
        try:
            sources = await asyncio.to_thread(self._scan)
        except RepositoryError as exc:
            log.error("model repository %s: %s; nothing changed", trigger, exc)
            return
        self._refresh(sources, trigger)
        for entry in list(self._models.values()):
            await self._apply(entry, settle=True)

    # -- loading and unloading ----------------------------------------------------

    @staticmethod
    def _wanted(entry: ModelEntry) -> set[int]:
        """The versions `entry` should serve: its policy's (or LoadModel's) selection among those on disk."""
        source = entry.source
        if source is None or not entry.wanted:
            return set()
        if source.config_error:
            return {v.version for v in entry.ready()}  # an unusable config.json changes nothing that serves
        if entry.selected is not None:
            return entry.selected & set(source.versions)
        return source.config.version_policy.select(source.versions)

    async def _apply(self, entry: ModelEntry, *, settle: bool = False) -> None:
        """Bring `entry` to what it should serve: load new versions first, then unload the rest.

        A selected version that fails leaves the versions already serving in place.
        """
        async with entry.lock:
            source = entry.source
            available = source.versions if source else {}
            if source and source.config_error:
                for slot in entry.slots.values():
                    if slot.state is not State.READY:
                        slot.state, slot.reason = State.FAILED, source.config_error
            wanted = self._wanted(entry)
            for version in sorted(wanted, reverse=True):  # the newest first: it becomes the default soonest
                slot, path = entry.slots[version], available[version]
                stamp = await asyncio.to_thread(file_stamp, path)
                if slot.state is State.READY and slot.loaded is not None:
                    if stamp != slot.loaded.stamp and (not settle or await _settled(path, stamp)):
                        await self._reload_in_place(entry, slot, path)
                    continue
                if slot.state is State.FAILED and slot.failed_stamp == stamp:
                    continue  # the same broken file: not tried again until it changes
                if settle and not await _settled(path, stamp):
                    continue
                await self._load(entry, slot, path)
            serving = {v.version for v in entry.ready()}
            if serving & wanted or not wanted:
                for version in sorted(serving - wanted):
                    await self._unload(entry, entry.slots[version])
            for version, slot in list(entry.slots.items()):
                if version not in available and slot.state in (State.UNAVAILABLE, State.FAILED):
                    del entry.slots[version]  # gone from disk and not serving
                elif slot.state is State.UNAVAILABLE and version not in wanted:
                    slot.reason = _not_loaded_reason(entry)
            if source is None and not entry.slots:
                del self._models[entry.name]
                self._on_change(entry.name)
                return
            self._changed(entry)

    def _batching(self, entry: ModelEntry) -> Batching:
        config, model = self._config, (entry.source.config if entry.source else repository.ModelConfig())
        return Batching(
            max_batch_size=model.max_batch_size or config.max_batch_size,
            max_batch_delay_ms=config.max_batch_delay_ms
            if model.max_batch_delay_ms is None
            else model.max_batch_delay_ms,
            max_queue=model.max_queue or config.max_queue,
            model_threads=model.model_threads or config.resolved_decode_workers,
        )

    async def _load(self, entry: ModelEntry, slot: VersionSlot, path: Path) -> None:
        loaded_count = sum(len(e.ready()) for e in self._models.values())
        if self._config.max_loaded_models and loaded_count >= self._config.max_loaded_models:
            slot.state = State.FAILED
            slot.reason = f"--max-loaded-models {self._config.max_loaded_models} versions are loaded: unload one first"
            slot.failed_stamp = None
            self._metrics.model_loads.labels(entry.name, LOAD_FAILED).inc()
            log.error("model %s version %d not loaded: %s", entry.name, slot.version, slot.reason)
            return
        slot.state, slot.reason = State.LOADING, ""
        self._changed(entry)
        batching = self._batching(entry)
        started = time.monotonic()
        stamp = await asyncio.to_thread(file_stamp, path)
        try:
            async with self._load_lock:
                served, forward, memory = await asyncio.to_thread(self._prepare, path, batching)
        except Exception as exc:  # anything: a load must never take the server down
            slot.state, slot.reason, slot.failed_stamp = State.FAILED, _reason(exc), stamp
            self._metrics.model_loads.labels(entry.name, LOAD_FAILED).inc()
            log.error("model %s version %d failed to load: %s", entry.name, slot.version, slot.reason)
            self._changed(entry)
            return
        label = str(slot.version)
        metrics = self._metrics.version_metrics(entry.name, label)
        batcher = Batcher(
            served,
            max_batch_size=batching.max_batch_size,
            max_delay_s=batching.max_batch_delay_ms / 1000.0,
            max_queue=batching.max_queue,
            metrics=metrics,
            threads=batching.model_threads,
            torch_threads=self._torch_threads,
            name=(entry.name, label),
            slots=self._slots,
        )
        batcher.start()
        slot.loaded = LoadedVersion(entry.name, slot.version, path, batcher, metrics, batching, stamp, memory, forward)
        slot.state, slot.reason, slot.failed_stamp = State.READY, "", None
        self._metrics.model_loads.labels(entry.name, LOAD_OK).inc()
        self._metrics.queue_capacity.labels(entry.name, label).set(batching.max_queue)
        self._metrics.model_memory.labels(entry.name, label).set(memory)
        self._set_info(entry.name, label, served)
        log.info(
            "model %s version %d READY in %.2f s (%s, +%.0f MiB; Classify's forward pass: %s)",
            entry.name, slot.version, time.monotonic() - started, served.build, memory / 2**20, forward,
        )  # fmt: skip
        self._changed(entry)

    def _prepare(self, path: Path, batching: Batching) -> tuple[ServedModel, str, int]:
        """On a worker thread: load, verify, optimize and warm up a model file; -> (model, forward note, RSS added)."""
        before = rss_bytes()
        if not path.is_file():
            raise ModelFileError(f"{path}: no {repository.MODEL_FILE} in the version folder")
        config = self._config
        loaded = load_model(path, self._device)
        served = ServedModel.create(loaded, max_pixels=config.max_image_pixels, input_shape=config.input_shape)
        check_forward(served)
        try:
            served, forward = served.optimized(batching.max_batch_size, config.optimize)
            served.warmup(batching.max_batch_size)
        except Exception as exc:  # the model cannot serve what its file (or --input-shape) says it takes
            raise ModelFileError(f"warm-up failed: {error_summary(exc)}") from None
        return served, forward, max(0, rss_bytes() - before)

    async def _reload_in_place(
        self, entry: ModelEntry, slot: VersionSlot, path: Path, trigger: str = "file change"
    ) -> bool:
        """Swap a READY version's changed file in between batches; the old model serves on if the new one fails."""
        current = slot.loaded
        assert current is not None
        started = time.monotonic()
        stamp = await asyncio.to_thread(file_stamp, path)

        def prepare() -> tuple[ServedModel, str] | None:
            loaded = load_model(path, self._device)
            if loaded.sha256 == current.served.loaded.sha256:
                return None
            new = ServedModel.create(
                loaded, max_pixels=self._config.max_image_pixels, input_shape=self._config.input_shape
            )
            check_compatible(current.served, new)
            check_forward(new)
            new, forward = new.optimized(current.batching.max_batch_size, self._config.optimize)
            new.warmup(current.batching.max_batch_size)
            return new, forward

        try:
            async with self._load_lock:
                prepared = await asyncio.to_thread(prepare)
        except Exception as exc:
            current.stamp = stamp  # tried: not again until the file changes
            self._metrics.model_loads.labels(entry.name, LOAD_FAILED).inc()
            log.error(
                "model %s version %d: reload (%s) refused: %s; still serving %s",
                entry.name, slot.version, trigger, _reason(exc), current.served.build,
            )  # fmt: skip
            return False
        current.stamp = stamp
        if prepared is None:
            log.info(
                "model %s version %d: reload (%s): %s is unchanged (same SHA-256)",
                entry.name,
                slot.version,
                trigger,
                path,
            )
            return True
        new, current.forward = prepared
        old = current.batcher.swap_model(new)
        self._metrics.model_loads.labels(entry.name, LOAD_OK).inc()
        self._set_info(entry.name, current.label, new, replaced=old)
        log.info(
            "model %s version %d reloaded (%s): %s -> %s in %.2f s",
            entry.name, slot.version, trigger, old.build, new.build, time.monotonic() - started,
        )  # fmt: skip
        self._changed(entry)
        return True

    async def _unload(self, entry: ModelEntry, slot: VersionSlot) -> None:
        """Stop routing to the version, answer the calls it accepted, then stop its batcher."""
        loaded = slot.loaded
        if loaded is None:
            return
        slot.state, slot.reason = State.UNLOADING, ""
        self._changed(entry)
        deadline = time.monotonic() + self._config.grace_period_s
        while loaded.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if loaded.active:
            log.warning(
                "model %s version %d: %d calls still running after the grace period",
                entry.name,
                slot.version,
                loaded.active,
            )
        await asyncio.to_thread(loaded.batcher.close, self._config.grace_period_s)
        slot.loaded = None
        slot.state = State.UNAVAILABLE
        slot.reason = "unloaded"
        self._metrics.forget_version(entry.name, loaded.label)
        log.info("model %s version %d unloaded", entry.name, slot.version)
        self._changed(entry)

    def _set_info(self, model: str, version: str, served: ServedModel, replaced: ServedModel | None = None) -> None:
        info = self._metrics.model_info
        if replaced is not None:
            old = (model, version, replaced.build, str(replaced.device), replaced.architecture)
            if replaced.build != served.build:
                info.labels(*old).set(0)
                try:
                    info.remove(*old)
                except KeyError:
                    pass
        info.labels(model, version, served.build, str(served.device), served.architecture).set(1)

    def _changed(self, entry: ModelEntry) -> None:
        entry.recompute_route()
        counts = {state: 0 for state in State}
        for slot in entry.slots.values():
            counts[slot.state] += 1
        for state, count in counts.items():
            self._metrics.model_versions.labels(entry.name, state.value).set(count)
        route = entry.route
        for candidate in (route.canary, route.shadow):
            if candidate is not None and route.default is not None:
                self._metrics.shadow_pair(entry.name, route.default.label, candidate.label)
        self._on_change(entry.name)

    # -- management -----------------------------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"unknown model {name!r}; {self.describe_available()}")
        return entry

    def _check_supervised(self, what: str) -> None:
        if self._config.supervised:
            raise FailedPrecondition(
                f"{what}: this process is one of --workers N, each with its own models, and the call reaches one; "
                "manage models on a server of one process per host (or pod), or with poll mode and config.json"
            )

    def _check_control(self, what: str) -> None:
        self._check_supervised(what)
        if self._config.model_control_mode != "explicit":
            raise FailedPrecondition(
                f"{what} needs --model-control-mode explicit (this server runs {self._config.model_control_mode}: "
                "its repository decides what is loaded)"
            )

    async def load(self, name: str, versions: list[str] | tuple[str, ...] = ()) -> ModelStatus:
        """Management: load a model (its policy's versions, or those named) and answer once they are READY or FAILED."""
        self._check_control("loading a model")
        sources = await asyncio.to_thread(self._scan)  # the request may name what was just published
        self._refresh(sources, "load request")
        entry = self.entry(name)
        if versions:
            numbers = {self._parse_version(entry, v) for v in versions}
            entry.selected = numbers | {v.version for v in entry.ready()}
        else:
            entry.selected = None
        entry.wanted = True
        await self._apply(entry)
        status = self.status(name)
        if self._config.max_loaded_models and any(
            s.state is State.FAILED and "--max-loaded-models" in s.reason for s in status.versions
        ):
            raise ResourceExhausted(
                f"--max-loaded-models {self._config.max_loaded_models} versions are loaded: unload one first"
            )
        return status

    async def unload(self, name: str, versions: list[str] | tuple[str, ...] = ()) -> ModelStatus:
        """Management: unload the versions named (all when none), after the calls they accepted are answered."""
        self._check_control("unloading a model")
        entry = self.entry(name)
        if versions:
            targets = {self._parse_version(entry, v) for v in versions}
            entry.selected = {v.version for v in entry.ready()} - targets
        else:
            entry.wanted, entry.selected = False, None
        await self._apply(entry)
        return self.status(name)

    def set_default_version(self, name: str, version: str) -> ModelStatus:
        """Promote or roll back: the version calls that name none get ("" unpins: the highest READY)."""
        self._check_supervised("setting the default version")
        entry = self.entry(name)
        before = entry.default_version()
        if version:
            number = self._parse_version(entry, version)
            if number not in {v.version for v in entry.ready()}:
                raise FailedPrecondition(f"model {name!r} version {number} is not READY; {self._ready_text(entry)}")
            entry.pinned = number
            if entry.canary == number:
                entry.canary, entry.canary_weight = None, 0.0
            if entry.shadow == number:
                entry.shadow = None
        else:
            entry.pinned = None
        after = entry.default_version()
        if before is not None and (after is None or after.version != before.version):
            entry.previous_default = before.version
        log.info(
            "model %s: default version %s (%s)",
            name,
            after.version if after else "none",
            "pinned" if entry.pinned else "latest READY",
        )
        self._changed(entry)
        return self.status(name)

    def set_traffic(self, name: str, canary_version: str, canary_weight: float, shadow_version: str) -> ModelStatus:
        """Canary (a weighted share of calls naming no version) and shadow, each a READY version or none."""
        self._check_supervised("setting traffic rules")
        entry = self.entry(name)
        ready = {v.version for v in entry.ready()}
        default = entry.default_version()
        if not 0.0 <= canary_weight <= 1.0 or math.isnan(canary_weight):
            raise InvalidArgument(f"canary_weight must lie in [0, 1] (got {canary_weight})")
        canary = self._parse_version(entry, canary_version) if canary_version else None
        shadow = self._parse_version(entry, shadow_version) if shadow_version else None
        for what, number in (("canary", canary), ("shadow", shadow)):
            if number is not None and number not in ready:
                raise FailedPrecondition(f"{what} version {number} of {name!r} is not READY; {self._ready_text(entry)}")
            if number is not None and default is not None and number == default.version:
                raise InvalidArgument(f"{what} version {number} is the default version of {name!r}: name another")
        if canary is None and canary_weight:
            raise InvalidArgument("canary_weight without canary_version")
        entry.canary, entry.canary_weight, entry.shadow = canary, canary_weight if canary else 0.0, shadow
        log.info(
            "model %s: canary %s, shadow %s",
            name,
            f"version {canary} at {canary_weight:g}" if canary else "none",
            f"version {shadow}" if shadow else "none",
        )  # fmt: skip
        self._changed(entry)
        return self.status(name)

    def _parse_version(self, entry: ModelEntry, text: str) -> int:
        if not repository.VERSION.match(str(text)):
            raise InvalidArgument(f"version {text!r} is not a version number (1, 2, ...)")
        number = int(text)
        if number not in entry.slots:
            raise NotFound(f"model {entry.name!r} has no version {number}; {self._ready_text(entry)}")
        return number

    # -- routing (the hot path) -----------------------------------------------------

    def route(self, name: str, version: str) -> tuple[LoadedVersion, LoadedVersion | None]:
        """The version a call runs on, and the shadow to run it on too (None: none); raises NotFound/Unavailable."""
        entry = self._models.get(name or self.default_model or "")
        if entry is None:
            if not name:
                raise NotFound(f"this server has no default model: name one (model_name); {self.describe_available()}")
            raise NotFound(f"unknown model {name!r}; {self.describe_available()}")
        if version:
            slot = entry.slots.get(int(version)) if repository.VERSION.match(version) else None
            if slot is not None and slot.state is State.READY and slot.loaded is not None:
                return slot.loaded, None
            if slot is not None and slot.state is State.UNLOADING:
                raise Unavailable(
                    f"model {entry.name!r} version {version} is being unloaded; {self._ready_text(entry)}"
                )
            raise NotFound(f"model {entry.name!r} has no READY version {version!r}; {self._ready_text(entry)}")
        route = entry.route
        if route.default is None:
            raise NotFound(f"model {entry.name!r} has no READY version; {self.describe_available()}")
        if route.canary is not None and random.random() < route.canary_weight:
            return route.canary, route.shadow
        return route.default, route.shadow

    def loaded(self, name: str, version: str) -> LoadedVersion:
        """The version a probe or an info call means (never a canary)."""
        entry = self._models.get(name or self.default_model or "")
        if entry is not None and not version:
            if entry.route.default is None:
                raise NotFound(f"model {entry.name!r} has no READY version; {self.describe_available()}")
            return entry.route.default
        return self.route(name, version)[0]

    # -- what there is ----------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._models)

    def is_ready(self, name: str = "", version: str = "") -> bool:
        try:
            self.loaded(name, version)
        except (NotFound, Unavailable):
            return False
        return True

    def all_loaded(self) -> list[LoadedVersion]:
        return [v for entry in self._models.values() for v in entry.ready()]

    def status(self, name: str) -> ModelStatus:
        entry = self.entry(name)
        versions = []
        for number, slot in sorted(entry.slots.items()):
            served = slot.loaded.served if slot.loaded else None
            versions.append(
                VersionStatus(
                    number,
                    slot.state,
                    slot.reason,
                    served.build if served else "",
                    served.architecture if served else "",
                    slot.loaded.memory_bytes if slot.loaded else 0,
                )  # fmt: skip
            )
        default = entry.route.default
        return ModelStatus(
            name=name,
            versions=versions,
            default_version=default.version if default else None,
            pinned=entry.pinned is not None,
            previous_default=entry.previous_default,
            canary_version=entry.route.canary.version if entry.route.canary else None,
            canary_weight=entry.route.canary_weight if entry.route.canary else 0.0,
            shadow_version=entry.route.shadow.version if entry.route.shadow else None,
        )

    def statuses(self) -> list[ModelStatus]:
        return [self.status(name) for name in self._models]

    def describe_available(self) -> str:
        parts = [f"{e.name} ({self._ready_versions_text(e)})" for e in self._models.values()]
        return "available: " + (", ".join(parts) if parts else "none")

    def _ready_versions_text(self, entry: ModelEntry) -> str:
        ready = [str(v.version) for v in entry.ready()]
        if not ready:
            return "no READY version"
        return ("version " if len(ready) == 1 else "versions ") + ", ".join(ready)

    def _ready_text(self, entry: ModelEntry) -> str:
        return f"READY: {', '.join(str(v.version) for v in entry.ready()) or 'none'}"

    def summary(self) -> str:
        """For the ready line: every model with its READY versions (and the default model)."""
        parts = []
        for entry in self._models.values():
            states = ", ".join(f"{n} {s.state.value}" for n, s in sorted(entry.slots.items())) or "no versions"
            default = entry.route.default
            mark = "*" if entry.name == self.default_model else ""
            parts.append(f"{entry.name}{mark} [{states}; default {default.version if default else '-'}]")
        return "; ".join(parts) or "no models"

    # -- background work -------------------------------------------------------------

    def spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, trigger: str) -> None:
        """SIGHUP (or the file poller): `--model FILE` is reloaded in place; a repository is rescanned."""
        if self._config.model_repository:
            await self.poll(trigger)
            return
        entry = self._models[self._config.model_name]
        async with entry.lock:
            slot = entry.slots[1]
            if slot.state is State.READY:
                await self._reload_in_place(entry, slot, Path(self._model_file), trigger)

    async def watch(self) -> None:
        """Poll the repository (or the `--model` file) for changes until cancelled."""
        config = self._config
        if config.model_repository:
            interval = config.repository_poll_s
            while True:
                await asyncio.sleep(interval)
                await self.poll()
        interval = config.reload_poll_s
        last = await asyncio.to_thread(file_stamp, self._model_file)
        while True:
            await asyncio.sleep(interval)
            stamp = await asyncio.to_thread(file_stamp, self._model_file)
            if stamp is None or stamp == last:
                continue
            await asyncio.sleep(min(interval, SETTLE_S))  # let a writer finish: reload only a file that stood still
            if await asyncio.to_thread(file_stamp, self._model_file) != stamp:
                continue
            last = stamp
            loaded = self._models[config.model_name].slots[1].loaded
            if loaded is not None and loaded.stamp != stamp:
                await self.reload("file change")

    async def stop_background(self) -> None:
        """Cancel polling and any load not yet swapped in (its thread finishes, its result is dropped)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self, timeout: float) -> None:
        """Stop every batcher (after the server's drain: nothing is queued any more)."""
        for loaded in self.all_loaded():
            loaded.batcher.close(timeout=timeout)


def _routing(config: repository.ModelConfig) -> tuple:
    return config.default_version, config.canary_version, config.canary_weight, config.shadow_version


def _route_from_config(entry: ModelEntry, config: repository.ModelConfig) -> None:
    """config.json's default version, canary and shadow (versions not READY are skipped when routing)."""
    entry.pinned = config.default_version
    entry.canary, entry.canary_weight = config.canary_version, config.canary_weight if config.canary_version else 0.0
    entry.shadow = config.shadow_version


async def _settled(path: Path, stamp) -> bool:
    """True when the file still has `stamp` a moment later (a writer that is not done would have changed it)."""
    if stamp is None:
        return False
    await asyncio.sleep(SETTLE_S)
    return await asyncio.to_thread(file_stamp, path) == stamp


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (ReloadRefused, ModelFileError, RepositoryError)) else error_summary(exc)


def _not_loaded_reason(entry: ModelEntry) -> str:
    if not entry.wanted or entry.selected is not None:
        return "not loaded (--model-control-mode explicit: load it with LoadModel)"
    policy = entry.source.config.version_policy if entry.source else None
    return f"not selected by the version policy ({policy.describe()})" if policy else "not in the repository"


def _versions(versions) -> str:
    return ", ".join(map(str, versions)) or "none"
