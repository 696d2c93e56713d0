"""The drop-in ``INSID3`` class (the published stateful API over the stateless core) and ``build_insid3``."""

from __future__ import annotations

import glob
import os
from typing import Iterable, Iterator, Sequence

import torch

from .errors import InputError, WeightsError
from .inputs import ImageLike, MaskLike, load_image, load_mask
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


class INSID3(torch.nn.Module):
    """Training-free in-context segmentation with a frozen DINOv3 encoder (drop-in for the published class).

    Args:
        encoder: any module with Meta's ``get_intermediate_layers`` (ours from ``load_dinov3``,
            the published hub models, a test double).
        image_size, svd_components, tau, merge_threshold, mask_refiner, resize_to_orig_size:
            the published parameters and defaults.
        device: None picks CUDA when available.
        backend: ``auto`` (native ops when built), ``native`` or ``reference``.
        connectivity: None (published clustering) or 4 / 8 (grid-constrained clustering).
        noise: input of the positional SVD, ``constant`` (published) or ``gaussian``.
        cache_key: identifies the weights for the positional-basis disk cache; default: the
            encoder's ``weights_fingerprint`` attribute when it has one.
        precision: ``fp32`` (parity) or ``bf16`` (backbone under autocast; for GPUs).
        compile: ``torch.compile`` the backbone pass (True, or a mode such as ``"reduce-overhead"``).
    """

    def __init__(self, encoder: torch.nn.Module, image_size: int = 1024, svd_components: int = 500,
                 tau: float = 0.6, merge_threshold: float = 0.2, mask_refiner: str = "bilinear",
                 resize_to_orig_size: bool = True, device: torch.device | str | None = None, *,
                 backend: str = "auto", connectivity: int | None = None, noise: str = "constant",
                 cache_key: str | None = None, cache_dir: str | None = None,
                 precision: str = "fp32", compile: bool | str = False) -> None:
        super().__init__()
        device = torch.device(device) if device is not None else default_device()
        self.encoder = encoder
        self.core = Segmenter(encoder, image_size, svd_components, tau, merge_threshold, mask_refiner,
                              connectivity, backend, device, noise,
                              cache_key if cache_key is not None else getattr(encoder, "weights_fingerprint", None),
                              cache_dir, precision, compile)
        self.image_size = image_size
        self.resize_to_orig_size = resize_to_orig_size
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

    def reset_state(self) -> None:
        """Forget the references and the target set so far."""
        self._ref_images: list[torch.Tensor] = []
        self._ref_masks: list[torch.Tensor | None] = []
        self._tgt_image: torch.Tensor | None = None
        self._orig_ref_sizes: list[tuple[int, int]] = []
        self._orig_tgt_size: tuple[int, int] | None = None

    # ---- the published stateful API ----
    def set_reference(self, image: ImageLike, mask: MaskLike | None = None) -> None:
        """Add a reference shot (call once per shot); the mask may be omitted for ``match``."""
        tensor, orig = load_image(image, self.image_size)
        self._ref_masks.append(None if mask is None else load_mask(mask, self.image_size, expected_hw=orig))
        self._ref_images.append(tensor)
        self._orig_ref_sizes.append(orig)

    def set_target(self, image: ImageLike) -> None:
        """Set the image to segment (or to transfer keypoints to)."""
        self._tgt_image, self._orig_tgt_size = load_image(image, self.image_size)

    def segment(self) -> torch.Tensor:
        """Segment the target given the references set so far; a bool (H, W) mask. Clears the state."""
        if not self._ref_images or self._tgt_image is None or any(m is None for m in self._ref_masks):
            raise RuntimeError("segment() requires reference image(s), reference mask(s) and a target image")
        try:
            return self.predict_mask(torch.cat(self._ref_images), torch.cat(self._ref_masks), self._tgt_image)
        finally:
            self.reset_state()

    def match(self, src_kps: torch.Tensor, use_debiased: bool = True) -> torch.Tensor:
        """Transfer reference keypoints (K, 2) (x, y) to the target; (K, 2) target pixels. Clears the state."""
        if not self._ref_images or self._tgt_image is None:
            raise RuntimeError("match() requires a reference image and a target image")
        try:
            return self.predict_keypoint(self._ref_images[0], src_kps, self._tgt_image, use_debiased)
        finally:
            self.reset_state()

    @torch.no_grad()
    def predict_mask(self, ref_images: torch.Tensor, ref_masks: torch.Tensor, tgt_image: torch.Tensor) -> torch.Tensor:
        """Segment one target: ref_images (S, 3, H, W), ref_masks (S, H, W) bool, tgt_image (1, 3, H, W).

        All S + 1 images go through the backbone as one batch, as in the published code.
        """
        S = ref_images.shape[0]
        feats = self.core.features(torch.cat([ref_images.to(self.device), tgt_image.to(self.device)]))
        ref = self.core.encode_reference(ref_images, ref_masks, features=feats[:S])
        out = self._orig_tgt_size if self.resize_to_orig_size else None
        return self.core.segment(ref, tgt_image, [out], features=feats[S:])[0]

    @torch.no_grad()
    def predict_keypoint(self, ref_image: torch.Tensor, ref_kps: torch.Tensor, tgt_image: torch.Tensor,
                         use_debiased: bool = False) -> torch.Tensor:
        """Transfer keypoints (K, 2) from ref_image (1, 3, H, W) to tgt_image; (K, 2) target pixels."""
        kps = torch.as_tensor(ref_kps, dtype=torch.float32).to(self.device)
        if kps.ndim != 2 or kps.shape[-1] != 2 or kps.shape[0] == 0:
            raise InputError(f"keypoints must be a non-empty (K, 2) array of (x, y), got shape {tuple(kps.shape)}")
        feats = self.core.features(torch.cat([ref_image.to(self.device), tgt_image.to(self.device)]))
        if use_debiased:
            from .debias import debias
            feats = debias(feats, self.core.projector)
        # match() uses the first reference: its keypoints are in that image's pixels.
        ref_size = self._orig_ref_sizes[0] if self._orig_ref_sizes else tuple(ref_image.shape[-2:])
        tgt_size = self._orig_tgt_size or tuple(tgt_image.shape[-2:])
        return transfer_keypoints(feats[0], feats[1], kps, ref_size, tgt_size)

    # ---- many targets per reference ----
    def encode_reference(self, images: Sequence[ImageLike], masks: Sequence[MaskLike]) -> EncodedReference:
        """Encode reference shots once, to segment any number of targets against them."""
        if len(images) != len(masks) or not images:
            raise InputError(f"need one mask per reference image, got {len(images)} images and {len(masks)} masks")
        tensors, mask_tensors = [], []
        for image, mask in zip(images, masks):
            tensor, orig = load_image(image, self.image_size)
            tensors.append(tensor.to(self.device))
            mask_tensors.append(load_mask(mask, self.image_size, expected_hw=orig).to(self.device))
        return self.core.encode_reference(torch.cat(tensors), torch.cat(mask_tensors))

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
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        from concurrent.futures import ThreadPoolExecutor

        pin = self.device.type == "cuda"

        def load(chunk: list[ImageLike]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
            loaded = [load_image(t, self.image_size) for t in chunk]
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
                 svd_components: int = 500, tau: float = 0.6, merge_threshold: float = 0.2,
                 mask_refiner: str = "bilinear", resize_to_orig_size: bool = True,
                 device: torch.device | str | None = None, *, backend: str = "auto",
                 connectivity: int | None = None, dtype: torch.dtype | None = None,
                 cache_dir: str | None = None, precision: str = "fp32", compile: bool | str = False) -> INSID3:
    """Load DINOv3 weights and build an ``INSID3`` (the published ``build_insid3``, plus ``weights``)."""
    from .backbone import load_dinov3, weights_fingerprint

    path = find_weights(model_size or "large", weights)
    device = torch.device(device) if device is not None else default_device()
    encoder = load_dinov3(path, model_size=model_size, device=device, dtype=dtype)
    model = INSID3(encoder, image_size, svd_components, tau, merge_threshold, mask_refiner,
                   resize_to_orig_size, device, backend=backend, connectivity=connectivity,
                   cache_key=f"{weights_fingerprint(path)}|{dtype}|{precision}", cache_dir=cache_dir,
                   precision=precision, compile=compile)
    model.requires_grad_(False)
    return model
