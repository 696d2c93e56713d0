"""The drop-in ``INSID3`` class (the published stateful API over the stateless core) and ``build_insid3``."""

from __future__ import annotations

import glob
import os
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import InputError, StateError, WeightsError
from .inputs import (ImageLike, MaskLike, check_image_size_multiple, check_int, check_thresholds, load_image,
                     load_mask, warn_input, warn_non_finite)
from .keypoints import transfer_keypoints
from .pipeline import EncodedReference, Segmenter

# File-name stems of Meta's released checkpoints, per model size.
WEIGHT_STEMS = {
    "small": "dinov3_vits16_", "small_plus": "dinov3_vits16plus_", "base": "dinov3_vitb16_",
    "large": "dinov3_vitl16_", "huge_plus": "dinov3_vith16plus_", "7b": "dinov3_vit7b16_",
}


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Guards the bookkeeping of every model's stateful API (a few list operations, never the compute).
_STATE_LOCK = threading.Lock()


class INSID3(torch.nn.Module):
    """Training-free in-context segmentation with a frozen DINOv3 encoder (drop-in for the published class).

    Args:
        encoder: any module with Meta's ``get_intermediate_layers`` (ours from ``load_dinov3``,
            the published hub models, a test double).
        image_size, svd_components, tau, merge_threshold, mask_refiner, resize_to_orig_size:
            the published parameters and defaults. ``svd_components`` >= the embedding size C
            (the default 500 with ViT-S, C = 384) falls back to C // 2 with an ``InputWarning``
            (the published code would remove the whole embedding); None picks that rule silently.
            ``tau`` must be in [0, 1] and ``merge_threshold`` finite (InputError otherwise).
        device: None picks CUDA when available.
        backend: ``auto`` (native ops when built), ``native`` or ``reference``.
        connectivity: None (published clustering) or 4 / 8 (grid-constrained clustering).
        noise: input of the positional SVD, ``constant`` (published) or ``gaussian``.
        cache_key: identifies the weights for the positional-basis disk cache; default: the
            encoder's ``weights_fingerprint`` attribute when it has one.
        precision: ``fp32`` (parity) or ``bf16`` (backbone under autocast; for GPUs).
        compile: ``torch.compile`` the backbone pass (True, or a mode such as ``"reduce-overhead"``).
        exif_transpose: apply the EXIF orientation of image files and PIL images (the published
            code ignores it, so the default is off).

    Threads: the stateless calls (``encode_reference``, ``segment_targets``, ``stream``) may share
    one model between threads. The stateful ``set_reference``/``set_target``/``segment``/``match``
    sequence belongs to one thread at a time: a call from a second thread while another thread's
    sequence is pending raises ``StateError`` (``reset_state()`` discards the pending sequence).
    """

    def __init__(self, encoder: torch.nn.Module, image_size: int = 1024, svd_components: int | None = 500,
                 tau: float = 0.6, merge_threshold: float = 0.2, mask_refiner: str = "bilinear",
                 resize_to_orig_size: bool = True, device: torch.device | str | None = None, *,
                 backend: str = "auto", connectivity: int | None = None, noise: str = "constant",
                 cache_key: str | None = None, cache_dir: str | None = None,
                 precision: str = "fp32", compile: bool | str = False, exif_transpose: bool = False) -> None:
        super().__init__()
        device = torch.device(device) if device is not None else default_device()
        self.encoder = encoder
        self.core = Segmenter(encoder, image_size, svd_components, tau, merge_threshold, mask_refiner,
                              connectivity, backend, device, noise,
                              cache_key if cache_key is not None else getattr(encoder, "weights_fingerprint", None),
                              cache_dir, precision, compile)
        self.image_size = self.core.image_size
        self.resize_to_orig_size = resize_to_orig_size
        self.exif_transpose = bool(exif_transpose)
        self.reset_state()

    @property
    def device(self) -> torch.device:
        """The device everything runs on."""
        return self.core.device

    @property
    def backend(self) -> str:
        """``native`` or ``reference``: the path the post-backbone steps take."""
        return self.core.backend

    @property
    def positional_basis(self) -> torch.Tensor:
        """The (C, r) positional basis."""
        return self.core.basis

    @property
    def svd_components(self) -> int:
        """The rank r of the positional subspace actually removed."""
        return self.core.svd_components

    @property
    def tau(self) -> float:
        """The clustering similarity threshold (settable; validated)."""
        return self.core.tau

    @tau.setter
    def tau(self, value: float) -> None:
        self.core.tau = check_thresholds(value, self.core.merge_threshold)[0]

    @property
    def merge_threshold(self) -> float:
        """The cluster score threshold alpha (settable; validated)."""
        return self.core.merge_threshold

    @merge_threshold.setter
    def merge_threshold(self, value: float) -> None:
        self.core.merge_threshold = check_thresholds(self.core.tau, value)[1]

    @property
    def mask_refiner(self) -> str:
        """``bilinear`` or ``crf``."""
        return self.core.mask_refiner

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
        self._state_owner: int | None = None

    def _claim_state(self, method: str) -> None:
        """Make the calling thread the owner of the pending state; call with ``_STATE_LOCK`` held."""
        me = threading.get_ident()
        owner = self._state_owner
        if owner is not None and owner != me:
            raise StateError(
                f"INSID3.{method}() called from thread {me} while a set_reference/set_target/segment "
                f"sequence of thread {owner} is pending on this model: the two would mix references and "
                "targets. The stateful API belongs to one thread at a time: give each thread its own "
                "model, or share one model through the stateless encode_reference() and "
                "segment_targets()/stream() (or call reset_state() to discard the other sequence)")
        self._state_owner = me

    # ---- the published stateful API ----
    def set_reference(self, image: ImageLike, mask: MaskLike | None = None) -> None:
        """Add a reference shot (call once per shot); the mask may be omitted for ``match``.

        The mask is resized to the model size with nearest, whatever its own size (as the
        published code does); an ``InputWarning`` says so when its aspect ratio differs from
        its image's (a sign of a wrong mask).
        """
        tensor, orig = load_image(image, self.image_size, exif_transpose=self.exif_transpose)
        mask_tensor = None if mask is None else self._load_mask(image, orig, mask)
        with _STATE_LOCK:
            self._claim_state("set_reference")
            self._ref_masks.append(mask_tensor)
            self._ref_images.append(tensor)
            self._orig_ref_sizes.append(orig)

    def _load_mask(self, image: ImageLike, orig: tuple[int, int], mask: MaskLike) -> torch.Tensor:
        # A tensor image already at the model size says nothing about the photo's size.
        at_model_size = isinstance(image, torch.Tensor) and orig == (self.image_size, self.image_size)
        return load_mask(mask, self.image_size, expected_hw=None if at_model_size else orig,
                         mismatch="warn", exif_transpose=self.exif_transpose)

    def set_target(self, image: ImageLike) -> None:
        """Set the image to segment (or to transfer keypoints to)."""
        tensor, orig = load_image(image, self.image_size, exif_transpose=self.exif_transpose)
        with _STATE_LOCK:
            self._claim_state("set_target")
            self._tgt_image, self._orig_tgt_size = tensor, orig

    def _take_state(self, method: str) -> tuple[list, list, torch.Tensor | None, list, tuple[int, int] | None]:
        with _STATE_LOCK:
            self._claim_state(method)
            return (list(self._ref_images), list(self._ref_masks), self._tgt_image,
                    list(self._orig_ref_sizes), self._orig_tgt_size)

    def _release_state(self) -> None:
        with _STATE_LOCK:
            if self._state_owner in (None, threading.get_ident()):
                self._clear_state()

    def segment(self) -> torch.Tensor:
        """Segment the target given the references set so far; a bool (H, W) mask. Clears the state."""
        refs, masks, target, _, tgt_size = self._take_state("segment")
        try:
            if not refs or target is None or any(m is None for m in masks):
                raise RuntimeError("segment() requires reference image(s), reference mask(s) and a target image")
            out = tgt_size if self.resize_to_orig_size else None
            return self._predict_mask(torch.cat(refs), torch.cat(masks), target, out)
        finally:
            self._release_state()

    def match(self, src_kps: torch.Tensor, use_debiased: bool = True) -> torch.Tensor:
        """Transfer reference keypoints (K, 2) (x, y) to the target; (K, 2) target pixels. Clears the state.

        Keypoints with a NaN or infinite coordinate give NaN predictions (with an ``InputWarning``).
        """
        refs, _, target, ref_sizes, tgt_size = self._take_state("match")
        try:
            if not refs or target is None:
                raise RuntimeError("match() requires a reference image and a target image")
            return self._predict_keypoint(refs[0], src_kps, target, use_debiased, ref_sizes[0], tgt_size)
        finally:
            self._release_state()

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
        S = _check_image_batch("ref_images", ref_images)
        if _check_image_batch("tgt_image", tgt_image) != 1:
            raise InputError(f"tgt_image must be one image (1, 3, H, W), got {tuple(tgt_image.shape)}")
        if tuple(tgt_image.shape[-2:]) != tuple(ref_images.shape[-2:]):
            raise InputError(f"tgt_image is {tuple(tgt_image.shape[-2:])} px but ref_images are "
                             f"{tuple(ref_images.shape[-2:])}: they go through the backbone as one batch")
        if not isinstance(ref_masks, torch.Tensor) or ref_masks.ndim != 3 or ref_masks.shape[0] != S:
            got = tuple(ref_masks.shape) if isinstance(ref_masks, torch.Tensor) else type(ref_masks).__name__
            raise InputError(f"ref_masks must be a (S, H, W) tensor with one mask per reference image "
                             f"(S = {S}), got {got}")
        warn_non_finite(ref_images, "ref_images")
        warn_non_finite(tgt_image, "tgt_image")
        with torch.no_grad():
            feats = self.core.features(torch.cat([ref_images.to(self.device), tgt_image.to(self.device)]))
            ref = self.core.encode_reference(ref_images, ref_masks, features=feats[:S])
            return self.core.segment(ref, tgt_image, [out_size], features=feats[S:])[0]

    @torch.no_grad()
    def predict_keypoint(self, ref_image: torch.Tensor, ref_kps: torch.Tensor, tgt_image: torch.Tensor,
                         use_debiased: bool = False) -> torch.Tensor:
        """Transfer keypoints (K, 2) from ref_image (1, 3, H, W) to tgt_image; (K, 2) target pixels.

        Keypoints are in the pixels of the images last given to ``set_reference``/``set_target``
        (the tensors' own sizes when there are none); non-finite keypoints give NaN.
        """
        ref_size = self._orig_ref_sizes[0] if self._orig_ref_sizes else None
        return self._predict_keypoint(ref_image, ref_kps, tgt_image, use_debiased, ref_size, self._orig_tgt_size)

    def _predict_keypoint(self, ref_image: torch.Tensor, ref_kps: torch.Tensor, tgt_image: torch.Tensor,
                          use_debiased: bool, ref_size: tuple[int, int] | None,
                          tgt_size: tuple[int, int] | None) -> torch.Tensor:
        try:
            kps = torch.as_tensor(ref_kps, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise InputError("keypoints must be a (K, 2) array of numbers (x, y), "
                             f"got {type(ref_kps).__name__}") from None
        if kps.ndim != 2 or kps.shape[-1] != 2 or kps.shape[0] == 0:
            raise InputError(f"keypoints must be a non-empty (K, 2) array of (x, y), got shape {tuple(kps.shape)}")
        for name, image in (("ref_image", ref_image), ("tgt_image", tgt_image)):
            if _check_image_batch(name, image) != 1:
                raise InputError(f"{name} must be one image (1, 3, H, W), got {tuple(image.shape)}")
        finite = torch.isfinite(kps).all(dim=1)
        out = torch.full_like(kps, float("nan"), device=self.device)
        if not bool(finite.all()):
            warn_input(f"{int((~finite).sum())} of {kps.shape[0]} keypoints have a non-finite coordinate; "
                       "their predictions are NaN")
            if not bool(finite.any()):
                return out
        with torch.no_grad():
            feats = self.core.features(torch.cat([ref_image.to(self.device), tgt_image.to(self.device)]))
            if use_debiased:
                from .debias import debias
                feats = debias(feats, self.core.projector)
            # match() uses the first reference: its keypoints are in that image's pixels.
            ref_size = ref_size or tuple(ref_image.shape[-2:])
            tgt_size = tgt_size or tuple(tgt_image.shape[-2:])
            out[finite.to(self.device)] = transfer_keypoints(feats[0], feats[1], kps[finite].to(self.device),
                                                             ref_size, tgt_size)
        return out

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
        tensors, mask_tensors = [], []
        for image, mask in zip(images, masks):
            tensor, orig = load_image(image, self.image_size, exif_transpose=self.exif_transpose)
            tensors.append(tensor.to(self.device))
            mask_tensors.append(self._load_mask(image, orig, mask).to(self.device))
        return self.core.encode_reference(torch.cat(tensors), torch.cat(mask_tensors))

    def _check_reference(self, ref: object) -> EncodedReference:
        """InputError unless ``ref`` was encoded by a model of this image size and positional basis."""
        if not isinstance(ref, EncodedReference):
            raise InputError(f"ref must be what encode_reference() returns, got {type(ref).__name__}")
        size = tuple(ref.masks.shape[-2:])
        if size != (self.image_size, self.image_size):
            raise InputError(f"this reference was encoded at image size {size[-1]}, but the model segments at "
                             f"{self.image_size}: encode it with this model's encode_reference()")
        if ref.features.shape[1] != self.core.basis.shape[0] or ref.keys.shape[-1] != self.core.complement.shape[1]:
            raise InputError(f"this reference was encoded by a model with another embedding size or "
                             f"positional rank (features {ref.features.shape[1]}, keys {ref.keys.shape[-1]}; "
                             f"this model: {self.core.basis.shape[0]}, {self.core.complement.shape[1]}): "
                             "encode it with this model's encode_reference()")
        return ref

    def segment_targets(self, ref: EncodedReference, targets: Sequence[ImageLike],
                        batch_size: int = 8) -> list[torch.Tensor]:
        """Segment targets against an encoded reference, ``batch_size`` per backbone pass."""
        return list(self.stream(ref, targets, batch_size))

    def stream(self, ref: EncodedReference, targets: Iterable[ImageLike], batch_size: int = 8,
               prefetch: int = 2) -> Iterator[torch.Tensor]:
        """Yield one mask per target (e.g. video frames), batching the backbone passes.

        Images are decoded and resized in a background thread, ``prefetch`` batches ahead, so
        loading overlaps the compute; on CUDA the batch is pinned and copied asynchronously.
        """
        batch_size = check_int("batch_size", batch_size, minimum=1)
        prefetch = check_int("prefetch", prefetch, minimum=0)
        self._check_reference(ref)
        if isinstance(targets, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
            raise InputError(f"targets must be a list or an iterable of images, got one {type(targets).__name__}; "
                             "wrap it in a list")
        return self._stream(ref, targets, batch_size, prefetch)

    def _stream(self, ref: EncodedReference, targets: Iterable[ImageLike], batch_size: int,
                prefetch: int) -> Iterator[torch.Tensor]:
        from concurrent.futures import ThreadPoolExecutor

        pin = self.device.type == "cuda"

        def load(chunk: list[ImageLike]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
            loaded = [load_image(t, self.image_size, exif_transpose=self.exif_transpose) for t in chunk]
            tensors = [t for t, _ in loaded]
            if any(t.device.type != "cpu" for t in tensors):  # tensor inputs already on a device
                images = torch.cat([t.to(self.device) for t in tensors])
            else:
                images = torch.cat(tensors)
                if pin:
                    images = images.pin_memory()
            return images, [orig for _, orig in loaded]

        def chunks() -> Iterator[list[ImageLike]]:
            chunk: list[ImageLike] = []
            for target in targets:
                chunk.append(target)
                if len(chunk) == batch_size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = []
            for chunk in chunks():
                pending.append(pool.submit(load, chunk))
                if len(pending) > prefetch:
                    yield from self._segment_batch(ref, *pending.pop(0).result())
            for future in pending:
                yield from self._segment_batch(ref, *future.result())

    def _segment_batch(self, ref: EncodedReference, images: torch.Tensor,
                       sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        out = [s if self.resize_to_orig_size else None for s in sizes]
        return self.core.segment(ref, images.to(self.device, non_blocking=True), out)


def _as_list(items: object) -> list:
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _check_image_batch(name: str, images: object) -> int:
    """The batch size of a (B, 3, H, W) float image tensor, else InputError."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name} must be a normalised (B, 3, H, W) tensor, got {type(images).__name__}; "
                         "for paths, PIL images and arrays use set_reference()/set_target() or encode_reference()")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise InputError(f"{name} must be a normalised float (B, 3, H, W) tensor, got "
                         f"{images.dtype} {tuple(images.shape)}")
    return int(images.shape[0])


def find_weights(model_size: str, weights: str | os.PathLike | None = None) -> str:
    """The checkpoint to load: ``weights``, else ``$INSID3_WEIGHTS``, else ``pretrain/`` (file or folder)."""
    if model_size not in WEIGHT_STEMS:
        raise InputError(f"unknown model size {model_size!r}; choose one of {', '.join(WEIGHT_STEMS)}")
    candidates = [weights] if weights is not None else [os.environ.get("INSID3_WEIGHTS"), "pretrain"]
    for cand in filter(None, candidates):
        cand = os.fspath(cand)
        if os.path.isdir(cand) and os.path.isfile(os.path.join(cand, "config.json")):
            return cand  # a Hugging Face folder
        if os.path.isdir(cand):
            found = sorted(glob.glob(os.path.join(cand, WEIGHT_STEMS[model_size] + "*.pth")))
            if found:
                return found[0]
        elif os.path.exists(cand) or weights is not None:
            return cand
    raise WeightsError(
        f"no DINOv3 '{model_size}' weights found (looked in {weights or '$INSID3_WEIGHTS and pretrain/'}). "
        "The weights are gated by Meta: request access at https://github.com/facebookresearch/dinov3, "
        f"download {WEIGHT_STEMS[model_size]}pretrain_lvd1689m-*.pth into pretrain/, or pass --weights PATH")


def build_insid3(model_size: str | None = "large", weights: str | os.PathLike | None = None, image_size: int = 1024,
                 svd_components: int | None = 500, tau: float = 0.6, merge_threshold: float = 0.2,
                 mask_refiner: str = "bilinear", resize_to_orig_size: bool = True,
                 device: torch.device | str | None = None, *, backend: str = "auto",
                 connectivity: int | None = None, dtype: torch.dtype | None = None,
                 cache_dir: str | None = None, precision: str = "fp32", compile: bool | str = False,
                 exif_transpose: bool = False) -> INSID3:
    """Load DINOv3 weights and build an ``INSID3`` (the published ``build_insid3``, plus ``weights``).

    ``svd_components``: see ``INSID3`` (500 with ViT-S / ViT-S+ falls back to 192 with a warning).
    The scalar arguments are checked before the weights are read.
    """
    from .backbone import load_dinov3, weights_fingerprint

    check_image_size_multiple(image_size)
    check_thresholds(tau, merge_threshold)
    if svd_components is not None:
        check_int("svd_components", svd_components, minimum=0)
    path = find_weights(model_size or "large", weights)
    device = torch.device(device) if device is not None else default_device()
    encoder = load_dinov3(path, model_size=model_size, device=device, dtype=dtype)
    model = INSID3(encoder, image_size, svd_components, tau, merge_threshold, mask_refiner,
                   resize_to_orig_size, device, backend=backend, connectivity=connectivity,
                   cache_key=f"{weights_fingerprint(path)}|{dtype}|{precision}", cache_dir=cache_dir,
                   precision=precision, compile=compile, exif_transpose=exif_transpose)
    model.requires_grad_(False)
    return model
