"""The drop-in ``INSID3`` class (the published stateful API over the stateless core) and ``build_insid3``."""

from __future__ import annotations

import dataclasses
import functools
import glob
import numbers
import os
import threading
import weakref
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .config import MODEL_SIZES, Insid3Config, LoadConfig
from .core import Insid3Core, resolve_device
from .errors import InputError, WeightsError
from .inputs import ImageLike, MaskLike, check_int, load_image, load_mask, to_device, warn_input
from .pipeline import EncodedReference

if TYPE_CHECKING:
    from .capture import CapturedTarget

# File-name stems of Meta's released checkpoints, per model size (config.MODEL_SIZES, in order).
WEIGHT_STEMS = dict(zip(MODEL_SIZES, ("dinov3_vits16_", "dinov3_vits16plus_", "dinov3_vitb16_", "dinov3_vitl16_",
                                      "dinov3_vith16plus_", "dinov3_vit7b16_")))
# The defaults of the signatures below: the config's, written once there.
_MODEL, _LOAD = Insid3Config(), LoadConfig()


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return resolve_device("auto")


# Guards the bookkeeping of every model's stateful API (a few list operations, never the compute).
_STATE_LOCK = threading.Lock()


class INSID3(torch.nn.Module):
    """Training-free in-context segmentation with a frozen DINOv3 encoder (drop-in for the published class).

    Args:
        encoder: any module with Meta's ``get_intermediate_layers`` (ours from ``load_dinov3``,
            the published hub models, a test double).
        image_size, svd_components, tau, merge_threshold, mask_refiner, resize_to_orig_size,
        device, backend, connectivity, noise, precision, matmul_precision, compile, exif_transpose: the options of
            ``insid3_fast.config.Insid3Config`` (names, defaults, allowed values and meaning
            there; the first eight in the published order). ``device`` None: CUDA when available.
        cache_key: identifies the weights for the positional-basis disk cache; default: the
            encoder's ``weights_fingerprint`` attribute when it has one.
        cache_dir: the cache folder.

    ``INSID3.from_config(encoder, config)`` builds one from an ``Insid3Config``.

    The model is an ``nn.Module`` whose ``core`` (``insid3_fast.core.Insid3Core``) holds the
    encoder and the positional basis, projector and complement as buffers: ``model.to(...)``
    moves and casts all of them, and ``state_dict()`` holds the basis.

    Threads: the stateless calls (``encode_reference``, ``segment_targets``, ``stream``) may share
    one model between threads. The stateful ``set_reference``/``set_target``/``segment``/``match``
    sequence is the model's, as in the published class: any thread may continue it (a web
    handler's thread hop), and a call that continues a sequence another thread began or went on
    with gives an ``InputWarning``, since threads that run sequences at the same time mix their
    references and targets (as the published class does). Each call is atomic: a ``segment()``
    reads the references and target as they are when it starts.
    """

    def __init__(self, encoder: torch.nn.Module, image_size: int = _MODEL.image_size,
                 svd_components: int | None = _MODEL.svd_components, tau: float = _MODEL.tau,
                 merge_threshold: float = _MODEL.merge_threshold, mask_refiner: str = _MODEL.mask_refiner,
                 resize_to_orig_size: bool = _MODEL.resize_to_orig_size, device: torch.device | str | None = None, *,
                 backend: str = _MODEL.backend, connectivity: int | None = _MODEL.connectivity,
                 noise: str = _MODEL.noise, cache_key: str | None = None, cache_dir: str | None = None,
                 precision: str = _MODEL.precision, matmul_precision: str = _MODEL.matmul_precision,
                 compile: bool | str = _MODEL.compile, exif_transpose: bool = _MODEL.exif_transpose) -> None:
        super().__init__()
        # Thresholds that are no number at all (None, a string): the published class constructs
        # with them, and only its clustering or aggregation fails (see _defer_threshold).
        self._unset_thresholds: dict[str, object] = {}
        tau, merge_threshold, unset = _numeric_thresholds(tau, merge_threshold)
        config = Insid3Config(image_size=image_size, svd_components=svd_components, tau=tau,
                              merge_threshold=merge_threshold, mask_refiner=mask_refiner,
                              resize_to_orig_size=resize_to_orig_size, device=device, backend=backend,
                              connectivity=connectivity, noise=noise, precision=precision,
                              matmul_precision=matmul_precision, compile=compile, exif_transpose=exif_transpose)
        self.core = Insid3Core(encoder, config, cache_dir=cache_dir,
                               cache_key=cache_key if cache_key is not None else getattr(encoder, "weights_fingerprint", None))
        self.register_load_state_dict_pre_hook(_published_state_dict)
        self._mask_size: int | None = None  # an image_size assigned after construction (see the property)
        for name, value in unset.items():
            self._defer_threshold(name, value)
        self.reset_state()

    @classmethod
    def from_config(cls, encoder: torch.nn.Module, config: Insid3Config, *, cache_key: str | None = None,
                    cache_dir: str | None = None) -> "INSID3":
        """An ``INSID3`` with the options of ``config``."""
        return cls(encoder, **dataclasses.asdict(config), cache_key=cache_key, cache_dir=cache_dir)

    @property
    def config(self) -> Insid3Config:
        """The options this model runs with."""
        return self.core.config

    def __getstate__(self) -> dict:
        # The pending sequence's thread is a weak reference, which pickles (torch.save, deepcopy)
        # cannot hold; a copy has no thread of its own yet.
        state = dict(super().__getstate__())
        state["_state_thread"] = None
        return state

    # The published class keeps its options as plain attributes that code may assign; here each
    # assignment goes to the core, and does what the published class does with it (the positional
    # basis stays the one estimated at construction unless it is itself assigned).
    def __setattr__(self, name: str, value: object) -> None:
        if name == "encoder" and "core" in self.__dict__.get("_modules", {}):
            # nn.Module would register a module value as a new submodule, past the property.
            self.core.replace_encoder(value)
            return
        super().__setattr__(name, value)

    @property
    def encoder(self) -> torch.nn.Module:
        """The backbone (a submodule of ``core``). Assignable, as in the published class: the new
        encoder runs on the model's device, with the positional basis estimated at construction."""
        return self.core.encoder

    @property
    def image_size(self) -> int:
        """Side of the square the images are resized to.

        Assignable, with the published class's effect: its images keep the transform built at
        construction, only the reference masks that ``set_reference`` loads are resized to the
        assigned size (and then downsampled to the patch grid); the getter returns it.
        """
        return self.core.image_size if self._mask_size is None else self._mask_size

    @image_size.setter
    def image_size(self, value: int) -> None:
        value = check_int("image_size", value, minimum=1)
        if value != self.core.image_size:
            warn_input(f"image_size = {value} assigned after construction: as in the published code, only the "
                       f"reference masks set_reference loads are read at {value} px; images stay at "
                       f"{self.core.image_size} px (build a new model to change that)")
        self._mask_size = None if value == self.core.image_size else value

    @property
    def resize_to_orig_size(self) -> bool:
        """Whether masks come back at the target's original size (else image_size x image_size; settable)."""
        return self.core.config.resize_to_orig_size

    @resize_to_orig_size.setter
    def resize_to_orig_size(self, value: bool) -> None:
        self.core.reconfigure(resize_to_orig_size=value)

    @property
    def exif_transpose(self) -> bool:
        """Whether image files and PIL images are turned by their EXIF orientation."""
        return self.core.config.exif_transpose

    @property
    def device(self) -> torch.device:
        """The device everything runs on (the buffers'; follows ``model.to(...)``; assigning it
        moves the model there)."""
        return self.core.device

    @device.setter
    def device(self, value: torch.device | str) -> None:
        self.to(resolve_device(value))

    @property
    def backend(self) -> str:
        """``native`` or ``reference``: the kernels the post-backbone ops run."""
        return self.core.kernels

    @property
    def positional_basis(self) -> torch.Tensor:
        """The (C, r) positional basis (assignable, as in the published class: see ``Insid3Core.set_basis``)."""
        return self.core.basis

    @positional_basis.setter
    def positional_basis(self, value: torch.Tensor) -> None:
        self.core.set_basis(value)

    @property
    def svd_components(self) -> int:
        """The rank r of the positional subspace actually removed."""
        return self.core.svd_components

    @svd_components.setter
    def svd_components(self, value: int) -> None:
        # The published class reads svd_components once, to build the basis at construction.
        warn_input(f"svd_components = {value!r} assigned after construction changes nothing (as in the published "
                   f"code): the basis keeps rank {self.svd_components}; build a new model, or assign "
                   "positional_basis")

    @property
    def tau(self) -> float:
        """The clustering similarity threshold (settable; validated)."""
        return self._unset_thresholds.get("tau", self.core.tau)

    @tau.setter
    def tau(self, value: float) -> None:
        self._set_threshold("tau", value)

    @property
    def merge_threshold(self) -> float:
        """The cluster score threshold alpha (settable; validated)."""
        return self._unset_thresholds.get("merge_threshold", self.core.merge_threshold)

    @merge_threshold.setter
    def merge_threshold(self, value: float) -> None:
        self._set_threshold("merge_threshold", value)

    def _set_threshold(self, name: str, value: object) -> None:
        if _not_a_number(value):
            self._defer_threshold(name, value)
            return
        self.core.reconfigure(**{name: value})  # validated: a NaN or a bool is refused here
        self._unset_thresholds.pop(name, None)

    def _defer_threshold(self, name: str, value: object) -> None:
        """Keep a threshold that is no number, as the published class does: it constructs, and
        ``match()`` runs; segmenting raises until a number is assigned (there a TypeError)."""
        warn_input(f"{name}={value!r} is not a number: the model is built and match() works, as in the published "
                   f"code, but segmenting raises until a number is assigned (model.{name} = ...)")
        self._unset_thresholds[name] = value

    def _require_thresholds(self) -> None:
        """InputError when a threshold is no number (``_defer_threshold``)."""
        for name, value in self._unset_thresholds.items():
            raise InputError(f"{name} is {value!r}, not a number: assign one (model.{name} = ...) before segmenting")

    @property
    def mask_refiner(self) -> str:
        """``bilinear`` or ``crf`` (settable)."""
        return self.core.mask_refiner

    @mask_refiner.setter
    def mask_refiner(self, value: str) -> None:
        self.core.reconfigure(mask_refiner=value)

    def reset_state(self) -> None:
        """Forget the references and the target set so far (whichever thread set them)."""
        with _STATE_LOCK:
            self._clear_state()

    def _clear_state(self) -> None:
        self._ref_images: list[torch.Tensor] = []
        self._ref_masks: list[torch.Tensor | None] = []
        self._tgt_image: torch.Tensor | None = None
        self._orig_ref_sizes: list[tuple[int, int]] = []
        self._orig_tgt_size: tuple[int, int] | None = None
        # The thread of the pending sequence's last call (a weak reference to the Thread object:
        # thread ids are reused once a thread ends) and whether its thread hop was warned about.
        self._state_thread: weakref.ref | None = None
        self._hop_warned = False

    def _note_state_call(self, method: str) -> None:
        """Record the calling thread, warning once per sequence when it continues another
        thread's pending sequence; call with ``_STATE_LOCK`` held."""
        me = threading.current_thread()
        pending = bool(self._ref_images) or self._tgt_image is not None
        last = self._state_thread() if self._state_thread is not None else None
        # (No thread recorded with references pending: a copy or an unpickled model, not a hop.)
        if pending and self._state_thread is not None and last is not me and not self._hop_warned:
            self._hop_warned = True
            warn_input(f"INSID3.{method}() continues a set_reference/set_target sequence that another thread "
                       "began or went on with: the sequence is the model's, shared by every thread (as in "
                       "the published code), so threads that run sequences at the same time mix their "
                       "references and targets; give each thread its own model, or share one through "
                       "encode_reference() and segment_targets()/stream()")
        self._state_thread = weakref.ref(me)

    # ---- the published stateful API ----
    def set_reference(self, image: ImageLike, mask: MaskLike | None = None) -> None:
        """Add a reference shot (call once per shot); the mask may be omitted for ``match``.

        The mask is resized to the model size with nearest, whatever its own size (as the
        published code does); an ``InputWarning`` says so when its aspect ratio differs from
        its image's (a sign of a wrong mask).
        """
        tensor, orig = load_image(image, self.core.image_size, exif_transpose=self.exif_transpose)
        # An empty mask is kept, as published (match() does not read it; segment() refuses it).
        mask_tensor = None if mask is None else self._load_mask(image, orig, mask, empty="warn", size=self.image_size)
        with _STATE_LOCK:
            self._note_state_call("set_reference")
            self._ref_masks.append(mask_tensor)
            self._ref_images.append(tensor)
            self._orig_ref_sizes.append(orig)

    def _load_mask(self, image: ImageLike, orig: tuple[int, int], mask: MaskLike, empty: str = "raise",
                   size: int | None = None, exif_transpose: bool | None = None) -> torch.Tensor:
        # A tensor image already at the model size says nothing about the photo's size.
        at_model_size = isinstance(image, torch.Tensor) and orig == (self.core.image_size,) * 2
        exif = self.exif_transpose if exif_transpose is None else exif_transpose
        return load_mask(mask, size or self.core.image_size, expected_hw=None if at_model_size else orig,
                         mismatch="warn", exif_transpose=exif, empty=empty)

    def set_target(self, image: ImageLike) -> None:
        """Set the image to segment (or to transfer keypoints to)."""
        tensor, orig = load_image(image, self.core.image_size, exif_transpose=self.exif_transpose)
        with _STATE_LOCK:
            self._note_state_call("set_target")
            self._tgt_image, self._orig_tgt_size = tensor, orig

    def _take_state(self, method: str) -> tuple[list, list, torch.Tensor | None, list, tuple[int, int] | None]:
        """The references and target as they are now (what ``segment``/``match`` then reads)."""
        with _STATE_LOCK:
            self._note_state_call(method)
            return (list(self._ref_images), list(self._ref_masks), self._tgt_image,
                    list(self._orig_ref_sizes), self._orig_tgt_size)

    def segment(self) -> torch.Tensor:
        """Segment the target given the references set so far; a bool (H, W) mask.

        Clears the state when it returns; when it raises the state stays (as in the published
        code), so a missing piece can still be set and ``segment()`` called again.
        """
        refs, masks, target, _, tgt_size = self._take_state("segment")
        if not refs or target is None or any(m is None for m in masks):
            raise RuntimeError("segment() requires reference image(s), reference mask(s) and a target image")
        out = tgt_size if self.resize_to_orig_size else None
        mask = self._predict_mask(torch.cat(refs), torch.cat(masks), target, out)
        self.reset_state()  # as published: whatever was set meanwhile, by any thread
        return mask

    def match(self, src_kps: torch.Tensor, use_debiased: bool = True) -> torch.Tensor:
        """Transfer reference keypoints (K, 2) (x, y) to the target; (K, 2) target pixels.

        Keypoints with a NaN or infinite coordinate give NaN predictions (with an ``InputWarning``).
        Clears the state when it returns, not when it raises (as ``segment``).
        """
        refs, _, target, ref_sizes, tgt_size = self._take_state("match")
        if not refs or target is None:
            raise RuntimeError("match() requires a reference image and a target image")
        points = self._predict_keypoint(refs[0], src_kps, target, use_debiased, ref_sizes[0], tgt_size)
        self.reset_state()
        return points

    @torch.no_grad()
    def predict_mask(self, ref_images: torch.Tensor, ref_masks: torch.Tensor, tgt_image: torch.Tensor) -> torch.Tensor:
        """Segment one target: ref_images (S, 3, H, W), ref_masks (S, H, W) bool, tgt_image (1, 3, H, W).

        All S + 1 images go through the backbone as one batch, as in the published code. With
        ``resize_to_orig_size`` the mask has the size of the image last given to ``set_target``
        (the published behaviour; size x size when there is none).
        """
        out = self._orig_tgt_size if self.resize_to_orig_size else None
        return self._predict_mask(ref_images, ref_masks, tgt_image, out)

    def _predict_mask(self, ref_images: torch.Tensor, ref_masks: torch.Tensor, tgt_image: torch.Tensor,
                      out_size: tuple[int, int] | None) -> torch.Tensor:
        self._require_thresholds()
        return self.core.predict_episode(ref_images, ref_masks, tgt_image, out_size)

    @torch.no_grad()
    def predict_keypoint(self, ref_image: torch.Tensor, ref_kps: torch.Tensor, tgt_image: torch.Tensor,
                         use_debiased: bool = False) -> torch.Tensor:
        """Transfer keypoints (K, 2) from ref_image (1, 3, H, W) to tgt_image; (K, 2) target pixels.

        Keypoints are in the pixels of the images last given to ``set_reference``/``set_target``
        (the tensors' own sizes when there are none); non-finite keypoints give NaN.
        """
        ref_size = self._orig_ref_sizes[-1] if self._orig_ref_sizes else None
        return self._predict_keypoint(ref_image, ref_kps, tgt_image, use_debiased, ref_size, self._orig_tgt_size)

    def _predict_keypoint(self, ref_image: torch.Tensor, ref_kps: torch.Tensor, tgt_image: torch.Tensor,
                          use_debiased: bool, ref_size: tuple[int, int] | None,
                          tgt_size: tuple[int, int] | None) -> torch.Tensor:
        # match() uses the first reference: its keypoints are in that image's pixels.
        return self.core.match_keypoints(ref_image, ref_kps, tgt_image, use_debiased, ref_size, tgt_size)

    # ---- many targets per reference ----
    def encode_reference(self, images: Sequence[ImageLike] | ImageLike,
                         masks: Sequence[MaskLike] | MaskLike) -> EncodedReference:
        """Encode reference shots once, to segment any number of targets against them.

        ``images`` and ``masks``: one of each, or equal-length lists. Masks are resized as in
        ``set_reference``.
        """
        images, masks = _as_list(images), _as_list(masks)
        if len(images) != len(masks) or not images:
            raise InputError(f"need one mask per reference image, got {len(images)} images and {len(masks)} masks")
        config = self.core.config  # the whole call runs with the options it started with
        tensors, mask_tensors = [], []
        for image, mask in zip(images, masks):
            tensor, orig = load_image(image, self.core.image_size, exif_transpose=config.exif_transpose)
            tensors.append(tensor.to(self.device))
            mask_tensors.append(self._load_mask(image, orig, mask, exif_transpose=config.exif_transpose).to(self.device))
        return self.core.encode_reference(torch.cat(tensors), torch.cat(mask_tensors), config=config)

    def _check_reference(self, ref: object) -> EncodedReference:
        return self.core.check_reference(ref)

    def segment_targets(self, ref: EncodedReference, targets: Sequence[ImageLike],
                        batch_size: int = 8) -> list[torch.Tensor]:
        """Segment targets against an encoded reference, ``batch_size`` per backbone pass."""
        return list(self.stream(ref, targets, batch_size))

    def stream(self, ref: EncodedReference, targets: Iterable[ImageLike], batch_size: int = 8,
               prefetch: int = 2) -> Iterator[torch.Tensor]:
        """Yield one mask per target (e.g. video frames), batching the backbone passes.

        Images are decoded and resized in a background thread, ``prefetch`` batches ahead, so
        loading overlaps the compute; on CUDA the batch is pinned and copied asynchronously.
        Numpy arrays and tensors are copied when taken from ``targets`` (a source may reuse its
        buffer for the next frame); paths and PIL images are kept as given. If ``targets``
        itself raises, the masks of the targets it gave come out first, then its exception (an
        unreadable target is raised in its place, after the earlier masks).
        """
        batch_size = check_int("batch_size", batch_size, minimum=1)
        prefetch = check_int("prefetch", prefetch, minimum=0)
        self._require_thresholds()
        self._check_reference(ref)
        if isinstance(targets, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
            raise InputError(f"targets must be a list or an iterable of images, got one {type(targets).__name__}; "
                             "wrap it in a list")
        return self._stream(ref, targets, batch_size, prefetch)

    def _stream(self, ref: EncodedReference, targets: Iterable[ImageLike], batch_size: int,
                prefetch: int) -> Iterator[torch.Tensor]:
        from concurrent.futures import ThreadPoolExecutor

        pin = self.device.type == "cuda"
        # The whole stream runs with the options of its start (another thread's reconfigure()
        # applies to the next call): the loader thread reads ahead, so one snapshot serves both.
        config = self.core.config

        def load(chunk: list[ImageLike]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
            loaded = [load_image(t, self.core.image_size, exif_transpose=config.exif_transpose) for t in chunk]
            tensors = [t for t, _ in loaded]
            if any(t.device.type != "cpu" for t in tensors):  # tensor inputs already on a device
                images = torch.cat([t.to(self.device) for t in tensors])
            else:
                images = torch.cat(tensors)
                if pin:
                    images = images.pin_memory()
            return images, [orig for _, orig in loaded]

        source_error: list[Exception] = []  # what the targets iterable raised, once the frames it gave are out

        def chunks() -> Iterator[list[ImageLike]]:
            chunk: list[ImageLike] = []
            source = iter(targets)
            while True:
                try:
                    target = next(source)
                except StopIteration:
                    break
                except Exception as error:
                    # A failing source (a video reader at a corrupt packet) ends the stream after the
                    # frames it gave, read ahead or not: its error is raised once their masks are out.
                    source_error.append(error)
                    break
                chunk.append(_taken(target))
                if len(chunk) == batch_size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        def on_device(chunk: list[ImageLike]) -> bool:
            return any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in chunk)

        with ThreadPoolExecutor(max_workers=1) as pool:
            # Each entry gives its batch when called. Device tensors are resized here, on the
            # caller's thread and so on its CUDA stream, the one that wrote them: a loader thread
            # would read them on its own stream, unordered with the writes.
            pending = []
            for chunk in chunks():
                pending.append(functools.partial(load, chunk) if on_device(chunk) else pool.submit(load, chunk).result)
                if len(pending) > prefetch:
                    yield from self._segment_batch(ref, *pending.pop(0)(), config)
            for batch in pending:
                yield from self._segment_batch(ref, *batch(), config)
        if source_error:
            raise source_error.pop()

    def capture(self, ref: EncodedReference, batch_size: int = 1) -> CapturedTarget:
        """A call that segments ``batch_size`` targets against ``ref`` by one CUDA-graph replay.

        For fixed-shape streams (video): it takes normalised tensors (batch_size, 3, size, size)
        (e.g. from ``insid3_fast.inputs.load_image``) and returns (batch_size, size, size) masks
        at the model's image size (``captured(images, out_size=(H, W))`` resizes them after the
        replay). Bilinear refinement only. See ``Insid3Core.capture``.
        """
        self._require_thresholds()
        return self.core.capture(self._check_reference(ref), check_int("batch_size", batch_size, minimum=1))

    def _segment_batch(self, ref: EncodedReference, images: torch.Tensor, sizes: list[tuple[int, int]],
                       config: Insid3Config) -> list[torch.Tensor]:
        out = [s if config.resize_to_orig_size else None for s in sizes]
        return self.core.segment(ref, to_device(images, self.device), out, config=config)


def _published_state_dict(module: torch.nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Read the published class's state dict as ours.

    Its keys: ``encoder.*`` (the encoder's own names: Meta's, for the hub model it is built on)
    and, with the CRF, ``_crf.*``; its positional basis is an attribute computed at
    construction, not a buffer. They become ``core.encoder.*`` (Meta's names loaded into our
    timm backbone through the checkpoint loader's conversion) and our basis, projector and
    complement are kept, as the published model keeps its basis; ``_crf.*`` is dropped with a
    warning (our CRF has no learnt parameters to load).
    """
    old = prefix + "encoder."
    if not any(k.startswith(old) for k in state_dict) or any(k.startswith(prefix + "core.") for k in state_dict):
        return
    crf = [k for k in state_dict if k.startswith(prefix + "_crf.")]
    if crf:
        warn_input(f"the published CRF's {len(crf)} tensors (_crf.*) are not loaded: this package's CRF is built "
                   "from mask_refiner='crf' and has nothing to load")
        for key in crf:
            del state_dict[key]
    encoder_state = {key[len(old):]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(old)]}
    encoder = module.core.encoder
    if "cls_token" in encoder_state:  # Meta's names (ours are model.*): our backbone converts them
        from .backbone import DinoV3Backbone, load_meta_state

        if isinstance(encoder, DinoV3Backbone):
            load_meta_state(encoder, encoder_state)  # converted, checked and loaded here
            encoder_state = encoder.state_dict()
    for key, value in encoder_state.items():
        state_dict[prefix + "core.encoder." + key] = value
    for name, buffer in module.core.named_buffers(recurse=False):
        state_dict.setdefault(prefix + "core." + name, buffer)


def _taken(target: ImageLike) -> ImageLike:
    """``target`` as ``stream()`` keeps it: a numpy array or tensor copied, anything else as given."""
    # The target is decoded later, up to (prefetch + 1) batches on: a source that writes each frame
    # into one buffer (a decoder's ring buffer) would have it overwritten by then.
    if isinstance(target, np.ndarray):
        return target.copy()
    if isinstance(target, torch.Tensor):
        return target.detach().clone()  # on the caller's thread and stream, which wrote it
    return target


def _not_a_number(value: object) -> bool:
    """Is ``value`` no number of any kind (None, a string, ...)? Numbers, tensors and arrays are
    validated as thresholds; these are kept as the published class keeps them."""
    return not isinstance(value, (numbers.Number, torch.Tensor, np.ndarray, np.generic))


def _numeric_thresholds(tau: object, merge_threshold: object) -> tuple[object, object, dict[str, object]]:
    """(tau, merge_threshold) for the config, the defaults in place of those that are no number,
    and those ({name: value}), for ``INSID3._defer_threshold``."""
    unset = {name: value for name, value in (("tau", tau), ("merge_threshold", merge_threshold))
             if _not_a_number(value)}
    return (_MODEL.tau if "tau" in unset else tau,
            _MODEL.merge_threshold if "merge_threshold" in unset else merge_threshold, unset)


def _as_list(items: object) -> list:
    return list(items) if isinstance(items, (list, tuple)) else [items]


def find_weights(model_size: str, weights: str | os.PathLike | None = None) -> str:
    """The checkpoint to load: ``weights``, else ``$INSID3_WEIGHTS``, else ``pretrain/`` (file or folder)."""
    if model_size not in WEIGHT_STEMS:
        raise InputError(f"unknown model size {model_size!r}; choose one of {', '.join(WEIGHT_STEMS)}")
    env = os.environ.get("INSID3_WEIGHTS")
    candidates = [weights] if weights is not None else [env, "pretrain"]
    hints = []  # what the folders searched hold instead, for the message
    for cand in filter(None, candidates):
        cand = os.fspath(cand)
        if os.path.isdir(cand) and os.path.isfile(os.path.join(cand, "config.json")):
            return cand  # a Hugging Face folder
        if os.path.isdir(cand):
            found = sorted(glob.glob(os.path.join(cand, WEIGHT_STEMS[model_size] + "*.pth")))
            if found:
                return found[0]
            hints += _other_checkpoints(cand, model_size)
        elif os.path.exists(cand) or weights is not None:
            return cand
    where = f"'{os.fspath(weights)}'" if weights is not None else \
        (f"$INSID3_WEIGHTS = '{env}' and pretrain/" if env else "$INSID3_WEIGHTS (unset) and pretrain/")
    raise WeightsError(
        f"no DINOv3 '{model_size}' weights found (looked in {where}){'; ' + '; '.join(hints) if hints else ''}. "
        "The weights are gated by Meta: request access at https://github.com/facebookresearch/dinov3, "
        f"download {WEIGHT_STEMS[model_size]}pretrain_lvd1689m-*.pth into pretrain/, or pass --weights PATH")


def _other_checkpoints(folder: str, model_size: str) -> list[str]:
    """What ``folder`` holds instead of ``model_size``'s file: other sizes' files (with the
    --model-size that loads them) or a Hugging Face folder's weights without its config.json."""
    hints = []
    for size, stem in WEIGHT_STEMS.items():
        for path in sorted(glob.glob(os.path.join(folder, stem + "*.pth"))):
            if size != model_size:
                hints.append(f"it holds '{os.path.basename(path)}', a '{size}' checkpoint: pass --model-size {size} "
                             f"(or model_size='{size}')")
    if glob.glob(os.path.join(folder, "*.safetensors")) and not hints:
        hints.append(f"'{folder}' holds .safetensors weights but no config.json: a Hugging Face folder needs both")
    return hints


def build_insid3(model_size: str | None = _LOAD.model_size, weights: str | os.PathLike | None = _LOAD.weights,
                 image_size: int = _MODEL.image_size, svd_components: int | None = _MODEL.svd_components,
                 tau: float = _MODEL.tau, merge_threshold: float = _MODEL.merge_threshold,
                 mask_refiner: str = _MODEL.mask_refiner, resize_to_orig_size: bool = _MODEL.resize_to_orig_size,
                 device: torch.device | str | None = None, *, backend: str = _MODEL.backend,
                 connectivity: int | None = _MODEL.connectivity, dtype: torch.dtype | None = None,
                 cache_dir: str | None = None, precision: str = _MODEL.precision, compile: bool | str = _MODEL.compile,
                 exif_transpose: bool = _MODEL.exif_transpose, noise: str = _MODEL.noise,
                 matmul_precision: str = _MODEL.matmul_precision) -> INSID3:
    """Load DINOv3 weights and build an ``INSID3`` (the published ``build_insid3``, plus ``weights``).

    ``model_size`` None: read from the weights (``large`` when looking for them in pretrain/);
    ``dtype``: cast the backbone to it. The other options are ``Insid3Config``'s; they are all
    checked before the weights are read.
    """
    from .backbone import load_dinov3, weights_fingerprint

    load = LoadConfig(model_size=model_size, weights=None if weights is None else os.fspath(weights))
    tau, merge_threshold, unset = _numeric_thresholds(tau, merge_threshold)
    config = Insid3Config(image_size=image_size, svd_components=svd_components, tau=tau,
                          merge_threshold=merge_threshold, mask_refiner=mask_refiner,
                          resize_to_orig_size=resize_to_orig_size, device=device, backend=backend,
                          connectivity=connectivity, noise=noise, precision=precision,
                          matmul_precision=matmul_precision, compile=compile, exif_transpose=exif_transpose)
    path = find_weights(load.model_size or "large", load.weights)
    device = resolve_device(config.device)
    encoder = load_dinov3(path, model_size=load.model_size, device=device, dtype=dtype)
    model = INSID3.from_config(encoder, dataclasses.replace(config, device=str(device)),
                               cache_key=f"{weights_fingerprint(path)}|{dtype}|{precision}", cache_dir=cache_dir)
    model.requires_grad_(False)
    for name, value in unset.items():  # kept, as the published class keeps them (see INSID3)
        setattr(model, name, value)
    return model
