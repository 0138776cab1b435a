"""BackendManager: load models once, share them safely, evict under memory pressure.

Several browser sessions share one process. The manager keeps one ``Backend`` per
(modality, model id), loads each at most once even when two sessions ask at the same
time, and evicts the least recently used model that is not running when the loaded
weights exceed the memory budget. Each backend carries its own lock, held for a whole
run, so two sessions never interleave denoising steps on the same pipeline.
"""

from __future__ import annotations

import gc
import re
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import psutil
import torch

from backends.base import Backend
from backends.catalog import find_bundled, resolve_source
from backends.emu3 import HUB_MODELS as EMU3_HUB_MODELS
from backends.janus import HUB_MODELS as JANUS_HUB_MODELS
from backends.types import MODALITIES, ModelLoadError, StudioError, ValidationError

log = logging.getLogger(__name__)

Factory = Callable[[torch.device, torch.dtype], Backend]
# hub ids the studio knows the kind of before loading them (the AR image loader's Janus-Pro, Emu3-Gen)
KNOWN_HUB_MODELS = {hub_id: "image" for hub_id in JANUS_HUB_MODELS + EMU3_HUB_MODELS}


def pick_device(preference: str | None = "auto") -> torch.device:
    preference = (preference or "auto").lower()
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise StudioError("--device cuda was asked for, but no CUDA device is available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def default_memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.85)
    return int(psutil.virtual_memory().total * 0.5)


def backend_class(modality: str) -> type[Backend]:
    if modality == "image":
        from backends.image import ImageBackend

        return ImageBackend
    if modality == "text":
        from backends.text import TextBackend

        return TextBackend
    if modality == "video":
        from backends.video import VideoBackend

        return VideoBackend
    if modality == "audio":
        from backends.audio import AudioBackend

        return AudioBackend
    raise ValidationError(f"unknown modality '{modality}'; expected one of {', '.join(MODALITIES)}")


class BackendManager:
    def __init__(
        self,
        device: str | torch.device | None = "auto",
        dtype: torch.dtype | None = None,
        memory_budget_bytes: int | None = None,
        allowed_roots: list[Path] | None = None,
    ):
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.dtype = dtype or pick_dtype(self.device)
        self.memory_budget_bytes = memory_budget_bytes or default_memory_budget(self.device)
        self.allowed_roots = allowed_roots
        self._backends: OrderedDict[tuple[str, str], Backend] = OrderedDict()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._factories: dict[tuple[str, str], Factory] = {}
        self._lock = threading.Lock()
        # Loads run one at a time: library imports (diffusers' lazy modules) are not
        # thread-safe, and two loads at once would also double the memory peak.
        self._load_lock = threading.RLock()
        self.loads = 0  # how many real loads happened (a cache hit does not count)
        # the data dir's cache folder (set by the studio): where methods keep state on disk
        # (the prefix cache's blocks, the retrieval datastore); None = $FASTGEN_DATA_DIR/cache
        self.cache_dir: Path | None = None

    # -- registration ------------------------------------------------------------------
    def register_factory(self, modality: str, model_id: str, factory: Factory) -> None:
        """Make ``model_id`` loadable from code instead of a folder (tests, dummy models)."""
        self._factories[(modality, model_id)] = factory

    def known_factories(self, modality: str) -> list[str]:
        return [mid for (mod, mid) in self._factories if mod == modality]

    def known_modalities(self, model_id: str) -> set[str]:
        """The modalities a bundled or registered model id is known to belong to (empty for
        hub ids and folders, which are only known once loaded)."""
        model_id = (model_id or "").strip()
        found = {mod for (mod, mid) in self._factories if mid == model_id}
        entry = find_bundled(model_id)
        if entry is not None:
            found.add(entry.modality)
        if model_id in KNOWN_HUB_MODELS:
            found.add(KNOWN_HUB_MODELS[model_id])
        return found

    def check_modality(self, modality: str, model_id: str) -> None:
        """Refuse a known model of another modality before loading it: the loader would
        fail on a missing file with a server path instead of saying what went wrong."""
        known = self.known_modalities(model_id)
        if known and modality not in known:
            other = sorted(known)[0]
            raise ModelLoadError(f"'{model_id.strip()}' is {_article(other)} {other} model: "
                                 f"choose it in the {other.capitalize()} tab")

    # -- loading -----------------------------------------------------------------------
    def get(self, modality: str, model_id: str) -> Backend:
        key = (modality, (model_id or "").strip())
        with self._lock:
            backend = self._backends.get(key)
            if backend is not None:
                self._backends.move_to_end(key)
                return backend
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one loader per key; latecomers wait and then hit the cache
            with self._lock:
                backend = self._backends.get(key)
                if backend is not None:
                    self._backends.move_to_end(key)
                    return backend
            with self._load_lock:
                backend = self._load(*key)
            if self.cache_dir is not None:
                backend.cache_dir = self.cache_dir
            with self._lock:
                self._backends[key] = backend
                self._loading.pop(key, None)
                self.loads += 1
            self.evict_to_budget(keep=key)
            return backend

    def _load(self, modality: str, model_id: str) -> Backend:
        factory = self._factories.get((modality, model_id))
        if factory is not None:
            return factory(self.device, self.dtype)
        self.check_modality(modality, model_id)
        cls = backend_class(modality)
        source = resolve_source(model_id, self.allowed_roots)
        try:
            return cls.from_pretrained(model_id, source, self.device, self.dtype)
        except StudioError:
            raise
        except torch.OutOfMemoryError as exc:
            self.free_caches()
            raise ModelLoadError(f"out of memory while loading '{model_id}': {exc}") from exc
        except Exception as exc:  # library errors: offline hub, wrong folder layout...
            log.exception("loading %s failed", model_id)
            raise ModelLoadError(_load_failure_message(model_id, source, exc)) from exc

    # -- memory ------------------------------------------------------------------------
    def loaded(self) -> list[dict]:
        with self._lock:
            return [
                {"modality": m, "model": i, "bytes": b.memory_bytes(), "family": b.family}
                for (m, i), b in self._backends.items()
            ]

    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(b.memory_bytes() for b in self._backends.values())

    def evict_to_budget(self, keep: tuple[str, str] | None = None) -> list[tuple[str, str]]:
        """Unload least recently used models (skipping ``keep`` and busy ones)."""
        evicted = []
        with self._lock:
            for key in list(self._backends):
                if sum(b.memory_bytes() for b in self._backends.values()) <= self.memory_budget_bytes:
                    break
                if key == keep:
                    continue
                backend = self._backends[key]
                if not backend.lock.acquire(blocking=False):
                    continue  # running right now: never pull weights from under a run
                try:
                    del self._backends[key]
                    backend.unload()
                    evicted.append(key)
                finally:
                    backend.lock.release()
        if evicted:
            log.info("evicted %s to stay within the memory budget", evicted)
            self.free_caches()
        return evicted

    def unload(self, modality: str, model_id: str) -> bool:
        with self._lock:
            backend = self._backends.pop((modality, model_id), None)
        if backend is None:
            return False
        with backend.lock:
            backend.unload()
        self.free_caches()
        return True

    def unload_all(self) -> None:
        for modality, model_id in list(self._backends):
            self.unload(modality, model_id)

    def free_caches(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# "Checkout 'https://huggingface.co/<folder>/tree/main' for available files." (a local folder's
# remote code missing): a hub URL built from a server path
HUB_BROWSE_ADVICE = re.compile(r"\s*Checkout 'https?://huggingface\.co/[^']*'[^.]*\.?")


def _load_failure_message(model_id: str, source: str, exc: Exception) -> str:
    text = str(exc).splitlines()[0].rstrip(": ") if str(exc) else type(exc).__name__
    if source != model_id:  # a folder: name it as the user typed it, never by its server path
        text = text.replace(source, model_id)
    if Path(source).is_dir():  # transformers' advice to browse a hub repository named after the folder
        text = HUB_BROWSE_ADVICE.sub("", text).rstrip()
    if source == model_id and "/" in model_id and not Path(source).is_dir():  # a hub id, not a folder
        return (
            f"could not load '{model_id}' from the model hub (offline, or no such repository): {text[:300]}. "
            "Download it to a local folder and give its path instead."
        )
    return f"could not load '{model_id}': {text[:300]}"
