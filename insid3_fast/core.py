"""The stateless core, an ``nn.Module``: the backbone, the positional basis and one pipeline.

``Insid3Core`` owns the encoder (a submodule) and the debiasing tensors as registered buffers:
``basis`` B (C, r), ``projector`` I - B Bᵀ (C, C) and ``complement`` Q (C, C - r). So
``core.to(...)`` moves and casts them with the encoder, ``state_dict()`` holds them, and the
device is the buffers' device (not stored twice). A reference is encoded once into an
``EncodedReference``; each target then costs one backbone pass (batched over targets) plus the
stages of ``insid3_fast.pipeline`` on the kernels the backend selects. Keypoint matching and the
published one-episode call (``predict_episode``) live here too; ``insid3_fast.model.INSID3`` is
the published stateful API on top.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from . import ops, pipeline
from .config import BACKENDS, Insid3Config
from .debias import complement_basis, debias, has_orthonormal_columns, orthogonal_projector, positional_basis
from .errors import BackendError, InputError
from .inputs import PATCH_SIZE, check_out_size, resolve_svd_components, to_device, warn_input, warn_non_finite
from .keypoints import transfer_keypoints
from .pipeline import EncodedReference

if TYPE_CHECKING:
    from .capture import CapturedTarget, GraphRunner
from .refine import refine_with_crf, upsample_mask

log = logging.getLogger("insid3_fast")
_announced: set[str] = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The kernels ``backend`` selects on ``device``: ``native`` or ``reference`` (``auto``: native when built)."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "native" if ops.native_available(device) else "reference"
        if backend == "reference" and device.type not in _announced:
            _announced.add(device.type)
            log.warning("insid3_fast: native ops unavailable on %s (%s); using the slower reference "
                        "kernels. Build them with `pip install --no-build-isolation -e .`.", device.type,
                        ops.load_error() or "built without these kernels")
    elif backend == "native" and not ops.native_available(device):
        raise BackendError(f"backend='native' requested but the native ops are unavailable on "
                           f"{device.type} ({ops.load_error() or 'built without these kernels'}); "
                           "rebuild with `pip install --no-build-isolation -e .` or use backend='reference'")
    return backend


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device; None or ``"auto"``: CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_image_batch(name: str, images: object) -> int:
    """The batch size of a (B, 3, H, W) float image tensor, else InputError."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name} must be a normalised (B, 3, H, W) tensor, got {type(images).__name__}; "
                         "for paths, PIL images and arrays use set_reference()/set_target() or encode_reference()")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise InputError(f"{name} must be a normalised float (B, 3, H, W) tensor, got "
                         f"{images.dtype} {tuple(images.shape)}")
    return int(images.shape[0])


# Guards each core's (complement, basis_version) pair: readers take both under it, and set_basis
# replaces both under it. (load_state_dict copies other values into the same buffers outside it,
# after bumping the version: a load concurrent with segmentation is not supported.) Reentrant: an
# nn.Module buffer hook that reads the model may run inside set_basis.
_BASIS_LOCK = threading.RLock()


def check_basis_version(ref: EncodedReference, version: int) -> None:
    """InputError unless ``ref`` was encoded with the basis of this version (see ``set_basis``)."""
    if ref.basis_version != version:
        raise InputError("this reference was encoded before the positional basis was replaced (set_basis, or "
                         "load_state_dict with another basis): its features are in the old basis's "
                         "coordinates; encode it again")


def _same_values(current: torch.Tensor, incoming: object) -> bool:
    """Whether loading ``incoming`` into ``current`` leaves its values as they are."""
    if not isinstance(incoming, torch.Tensor) or incoming.shape != current.shape:
        return False
    if incoming.is_meta or current.is_meta:
        return False
    return torch.equal(current.detach(), incoming.detach().to(current.device, current.dtype))


def _count_loaded_basis(core: "Insid3Core", state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: other basis or complement values make a new basis version
    (references encoded before are refused, as after set_basis); counted before the copy."""
    for name in ("basis", "complement"):
        key = prefix + name
        if key in state_dict and not _same_values(getattr(core, name), state_dict[key]):
            with _BASIS_LOCK:
                core.basis_version += 1
            return


class Insid3Core(torch.nn.Module):
    """INSID3 without state: the backbone, the debiasing buffers and the configuration.

    Args:
        encoder: a module with Meta's ``get_intermediate_layers(x, n, reshape)`` (called as the published code
            calls it: its default ``norm=True``, the final LayerNorm, applies).
        config: the options (``Insid3Config``); keyword ``options`` override its fields.
        cache_key: identifies the weights for the on-disk positional-basis cache (None: no cache).
        cache_dir: the cache folder (default: ``$INSID3_CACHE`` or ``~/.cache/insid3_fast``).

    The post-backbone steps compute in the dtype of the buffers (float32, the parity mode,
    unless the module was cast); the ops take float32.
    """

    basis: torch.Tensor
    projector: torch.Tensor
    complement: torch.Tensor

    def __init__(self, encoder: torch.nn.Module, config: Insid3Config | None = None, *,
                 cache_key: str | None = None, cache_dir: str | None = None, **options: object) -> None:
        super().__init__()
        config = dataclasses.replace(config or Insid3Config(), **options)
        embed_dim = getattr(encoder, "embed_dim", None)
        embed_dim = embed_dim if isinstance(embed_dim, int) else None
        rank = resolve_svd_components(config.svd_components, embed_dim)
        device = resolve_device(config.device)
        resolve_backend(config.backend, device)  # fail now, not at the first target
        self.config = config
        self.encoder = encoder.to(device).eval()
        self._backbone = self._backbone_pass
        self._segment_patches = pipeline.segment_patches
        if config.compile:
            # Two graphs per target shape: the backbone pass and the post-backbone steps (the ops
            # have fake kernels, so both trace whole; with "reduce-overhead" each is a CUDA graph).
            mode = config.compile if isinstance(config.compile, str) else None
            self._backbone = torch.compile(self._backbone_pass, dynamic=False, mode=mode)
            self._segment_patches = torch.compile(pipeline.segment_patches, dynamic=False, mode=mode)
        basis = positional_basis(self.encoder, config.image_size, rank, config.noise, device,
                                 cache_key=cache_key, cache_dir=cache_dir)
        if rank < 0:
            warn_input(f"svd_components={rank} is negative: read as the published code reads it, as the slice "
                       f"U[:, :{rank}] of the singular vectors, so {basis.shape[1]} components are removed; "
                       f"give {basis.shape[1]} to say so")
        elif basis.shape[1] >= basis.shape[0]:  # an encoder without ``embed_dim``
            basis = basis[:, :resolve_svd_components(rank, basis.shape[0])].contiguous()
        elif basis.shape[1] < rank:
            warn_input(f"svd_components = {rank}, but the {config.image_size} px image has only {basis.shape[1]} "
                       f"patches: the positional subspace has rank {basis.shape[1]} (as in the published code, "
                       "whose SVD has no more columns); a larger image_size gives the full rank")
        self.basis_version = 0  # counts the bases assigned since (set_basis); references record it
        self.register_buffer("basis", basis)
        self.register_buffer("projector", orthogonal_projector(basis))
        self.register_buffer("complement", complement_basis(basis))
        # A basis loaded with load_state_dict (other values into the same buffers) is a new basis too.
        self.register_load_state_dict_pre_hook(_count_loaded_basis)

    # ---- what the buffers and the config say ----
    @property
    def device(self) -> torch.device:
        """Where the buffers (and so the post-backbone steps) are."""
        return self.basis.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the post-backbone steps (the buffers'; float32 unless cast)."""
        return self.basis.dtype

    @property
    def kernels(self) -> str:
        """``native`` or ``reference``: the kernels the ops run, for the current device."""
        return self._kernels_of(self.config)

    backend = kernels

    def _kernels_of(self, config: Insid3Config) -> str:
        return resolve_backend(config.backend, self.device)

    @property
    def bf16x6(self) -> bool:
        """Whether the float32 products after the backbone are split-bf16 ones (``matmul_precision``)."""
        return self.config.matmul_precision == "bf16x6"

    @property
    def image_size(self) -> int:
        """Side of the square the images are resized to."""
        return self.config.image_size

    @property
    def svd_components(self) -> int:
        """The rank r of the positional subspace actually removed."""
        return int(self.basis.shape[1])

    @property
    def tau(self) -> float:
        """The clustering similarity threshold."""
        return self.config.tau

    @property
    def merge_threshold(self) -> float:
        """The cluster score threshold alpha."""
        return self.config.merge_threshold

    @property
    def mask_refiner(self) -> str:
        """``bilinear`` or ``crf``."""
        return self.config.mask_refiner

    @property
    def connectivity(self) -> int | None:
        """None (the published clustering) or 4 / 8."""
        return self.config.connectivity

    def reconfigure(self, **options: object) -> None:
        """Change thresholds or refiner (validated); options that shape the buffers cannot change."""
        unknown = set(options) - {f.name for f in dataclasses.fields(Insid3Config)}
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(sorted(unknown))}: the options are the fields of "
                             "insid3_fast.Insid3Config (tau, merge_threshold, mask_refiner, backend, ...)")
        fixed = {"image_size", "svd_components", "noise", "device", "compile"} & set(options)
        if fixed:
            raise InputError(f"{', '.join(sorted(fixed))} cannot change after construction: build a new model")
        config = dataclasses.replace(self.config, **options)
        resolve_backend(config.backend, self.device)
        self.config = config

    def replace_encoder(self, encoder: torch.nn.Module) -> None:
        """Run another backbone (moved to this model's device) with the positional basis estimated
        at construction, as the published class does when its ``encoder`` is assigned."""
        if not callable(getattr(encoder, "get_intermediate_layers", None)):
            raise InputError(f"an encoder needs Meta's get_intermediate_layers(x, n, reshape), "
                             f"{type(encoder).__name__} has none")
        warn_input("the encoder was replaced: the positional basis stays the one estimated from the first "
                   "encoder (as in the published code); build a new model to re-estimate it")
        self.encoder = encoder.to(self.device)

    def set_basis(self, basis: torch.Tensor) -> None:
        """Remove another (C, r) positional basis from now on: the published class's
        ``positional_basis`` assigned. References encoded before are refused afterwards.

        The published code debiases with P = I - B Bᵀ whatever B is; ``complement_basis`` gives
        coordinates with its inner products for any B (one without orthonormal columns, with an
        ``InputWarning``).
        """
        C = self.basis.shape[0]
        if not isinstance(basis, torch.Tensor) or basis.ndim != 2 or basis.shape[0] != C:
            got = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
            raise InputError(f"positional_basis must be a (C, r) tensor with C = {C}, got {got}")
        basis = basis.detach().to(self.device, self.dtype).contiguous()
        if not bool(torch.isfinite(basis).all()):
            raise InputError("positional_basis holds NaN or inf")
        orthonormal = has_orthonormal_columns(basis)
        if not orthonormal:
            warn_input("positional_basis does not have orthonormal columns (as the SVD's U does): it is used "
                       "as the published code uses it, through P = I - B B^T")
        projector, complement = orthogonal_projector(basis), complement_basis(basis)
        if complement.shape[1] == 0:
            raise InputError("this positional_basis removes the whole embedding (P = I - B B^T is 0): no "
                             "debiased feature would be left")
        if orthonormal and basis.shape[1] >= C:
            # The published code runs on what float rounding leaves of P (its result is noise): so do we.
            warn_input(f"this positional_basis spans all {C} dimensions: P = I - B B^T is zero but for float "
                       "rounding, and the debiased features (and masks) are that rounding residue, as in the "
                       "published code; remove fewer directions (r < C)")
        with _BASIS_LOCK:
            self.basis, self.projector, self.complement = basis, projector, complement
            self.basis_version += 1

    def _coordinates(self) -> tuple[torch.Tensor, int]:
        """The complement and the version of the basis it belongs to, read together (another
        thread's ``set_basis`` replaces both at once)."""
        with _BASIS_LOCK:
            return self.complement, self.basis_version

    # ---- backbone ----
    def _backbone_pass(self, images: torch.Tensor, bf16: bool) -> torch.Tensor:
        images = images.to(self.dtype)
        if bf16:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                fmap = self.encoder.get_intermediate_layers(images, n=1, reshape=True)[0]
        else:
            fmap = self.encoder.get_intermediate_layers(images, n=1, reshape=True)[0]
        return F.normalize(fmap.to(self.dtype), p=2, dim=1)

    @torch.no_grad()
    def features(self, images: torch.Tensor, config: Insid3Config | None = None) -> torch.Tensor:
        """L2-normalised features (B, C, h, w) of normalised images (B, 3, size, size), one batch
        (``config``: the options to run with, default the model's; see ``segment``)."""
        config = self.config if config is None else config
        return self._backbone(to_device(images, self.device), config.precision == "bf16")

    # ---- reference ----
    @torch.no_grad()
    def encode_reference(self, images: torch.Tensor, masks: torch.Tensor,
                         features: torch.Tensor | None = None, config: Insid3Config | None = None) -> EncodedReference:
        """Encode S shots: images (S, 3, size, size) normalised, masks (S, H, W).

        Masks of any dtype: a pixel is foreground where the mask is > 0, and the values (soft or
        0-255 masks) weigh the bilinear downsampling to the patch grid, as in the published
        ``predict_mask`` (its ``set_reference`` makes masks bool first: so does ours).
        ``features`` (S, C, h, w), when given, skips the backbone pass. ``config``: the options to
        run with (default: the model's, read once; see ``segment``).
        """
        config = self.config if config is None else config
        if not isinstance(masks, torch.Tensor) or masks.ndim != 3 or masks.shape[0] != images.shape[0]:
            got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise InputError(f"masks must be (S, H, W) with one mask per image (S = {images.shape[0]}), got {got}")
        masks = masks.to(self.device)
        if not bool((masks > 0).flatten(1).any(dim=1).all()):
            raise InputError("a reference mask is empty (no foreground pixel); every shot needs a mask")
        feats = self.features(images, config) if features is None else features.to(self.device, self.dtype)
        return self.encode_reference_features(feats, masks, config)

    def encode_reference_features(self, feats: torch.Tensor, masks: torch.Tensor,
                                  config: Insid3Config | None = None) -> EncodedReference:
        """Encode S shots from their normalised features (S, C, h, w) and masks (S, size, size)."""
        c = self.config if config is None else config
        complement, version = self._coordinates()
        ref = pipeline.encode_reference(feats, masks, complement, bf16x6=c.matmul_precision == "bf16x6",
                                        kernels=self._kernels_of(c))
        ref.basis_version = version
        return ref

    def debiased_coordinates(self, feats: torch.Tensor) -> torch.Tensor:
        """Debiased features (T, h*w, D) of normalised features (T, C, h, w), in complement coordinates."""
        c = self.config
        return pipeline.debiased_coordinates(feats, self._coordinates()[0], bf16x6=c.matmul_precision == "bf16x6",
                                             kernels=self._kernels_of(c))

    def check_reference(self, ref: object) -> EncodedReference:
        """``ref`` if this model encoded it (image size, embedding size, rank), else InputError."""
        if not isinstance(ref, EncodedReference):
            raise InputError(f"ref must be what encode_reference() returns, got {type(ref).__name__}")
        # The patch grid is what must agree (the masks themselves may be of any size).
        grid, side = tuple(ref.masks_down.shape[-2:]), self.image_size // PATCH_SIZE
        if grid != (side, side):
            raise InputError(f"this reference was encoded at image size {ref.masks.shape[-1]} ({grid[0]}x{grid[1]} "
                             f"patches), but the model segments at {self.image_size} ({side}x{side}): encode it "
                             "with this model's encode_reference()")
        check_basis_version(ref, self.basis_version)
        if ref.embed_dim != self.basis.shape[0] or ref.keys.shape[-1] != self.complement.shape[1]:
            raise InputError(f"this reference was encoded by a model with another embedding size or "
                             f"positional rank (features {ref.embed_dim}, keys {ref.keys.shape[-1]}; "
                             f"this model: {self.basis.shape[0]}, {self.complement.shape[1]}): "
                             "encode it with this model's encode_reference()")
        return ref

    # ---- target ----
    @torch.no_grad()
    def segment_patches(self, ref: EncodedReference, tgt_feat: torch.Tensor,
                        config: Insid3Config | None = None) -> torch.Tensor:
        """The (h, w) bool patch mask of one target given its normalised features (C, h, w)
        (``config``: the options to run with, default the model's; see ``segment``)."""
        c = self.config if config is None else config
        complement, version = self._coordinates()
        check_basis_version(ref, version)  # per target: a stream outlives a set_basis of another thread
        return self._segment_patches(ref, tgt_feat, complement, tau=c.tau, merge_threshold=c.merge_threshold,
                                     connectivity=c.connectivity, kernels=self._kernels_of(c),
                                     bf16x6=c.matmul_precision == "bf16x6")

    def finalize(self, patch_mask: torch.Tensor, image: torch.Tensor | None,
                 out_size: tuple[int, int] | None, config: Insid3Config | None = None) -> torch.Tensor:
        """Upsample a patch mask to the image's size (the model's without one), refine (CRF),
        resize to ``out_size`` (step 8). A tensor given at another size than the model's (the
        published ``predict_mask`` takes any) keeps its own size, as published."""
        c = self.config if config is None else config
        height, width = tuple(image.shape[-2:]) if image is not None else (self.image_size, self.image_size)
        mask = upsample_mask(patch_mask, height, width)
        if c.mask_refiner == "crf":
            if image is None:
                raise InputError("CRF refinement needs the target image")
            mask = refine_with_crf(image.to(mask.device), mask)
        if out_size is not None:
            mask = upsample_mask(mask, *out_size)
        return mask

    @torch.no_grad()
    def segment(self, ref: EncodedReference, images: torch.Tensor | None,
                out_sizes: Sequence[tuple[int, int] | None] | None = None,
                features: torch.Tensor | None = None, config: Insid3Config | None = None) -> list[torch.Tensor]:
        """Segment B targets (B, 3, size, size) in one backbone pass; a bool mask per target.

        ``out_sizes[b]`` is the size to resize each mask to (None: size x size). With
        ``features`` (B, C, h, w) given, ``images`` may be None (no backbone pass; no CRF).
        The whole batch runs with one set of options, ``config`` or else the model's as the call
        starts: a ``reconfigure`` from another thread meanwhile applies from the next call, never
        to half of a target.
        """
        c = self.config if config is None else config
        if images is not None:
            check_image_batch("images", images)
            # With features given, images only set each mask's size (predict_mask takes any size).
            if features is None and tuple(images.shape[-2:]) != (self.image_size,) * 2:
                raise InputError(f"images must be at the model size, (B, 3, {self.image_size}, {self.image_size}), "
                                 f"got {tuple(images.shape)}: resize them first (insid3_fast.inputs.load_image), "
                                 "or pass paths, PIL images or arrays to segment_targets()")
        elif features is None:
            raise InputError("segment() needs the images or their features")
        feats = self.features(images, c) if features is None else features.to(self.device, self.dtype)
        if out_sizes is None:
            out_sizes = [None] * feats.shape[0]
        elif len(out_sizes) != feats.shape[0]:
            raise InputError(f"out_sizes must hold one size (or None) per target: {len(out_sizes)} for "
                             f"{feats.shape[0]} targets")
        out_sizes = [check_out_size(size, "out_sizes[]") for size in out_sizes]
        # One host read per batch; the captured call decides the same on the device.
        finite = pipeline.finite_targets(feats).tolist()
        for b in (b for b, ok in enumerate(finite) if not ok):
            warn_input(f"target {b} of the batch has non-finite features (NaN/inf): its mask is empty")
        return [self.finalize(self.segment_patches(ref, feats[b], c) if finite[b] else
                              torch.zeros(feats.shape[2:], dtype=torch.bool, device=feats.device),
                              images[b:b + 1] if images is not None else None, out_sizes[b], c)
                for b in range(feats.shape[0])]

    def capture(self, ref: EncodedReference, batch: int = 1, runner: "GraphRunner | None" = None) -> "CapturedTarget":
        """A call that segments ``batch`` targets against ``ref`` by one CUDA-graph replay.

        Fixed shapes (batch, 3, size, size); bilinear refinement only (the CRF runs on the host);
        masks are (size, size), upsample them for other sizes. ``runner`` replaces the
        ``torch.cuda.CUDAGraph`` (see ``insid3_fast.capture``). Example::

            captured = core.capture(core.encode_reference(ref_images, ref_masks))
            for frame in frames:  # (1, 3, size, size) normalised
                mask = captured(frame)[0]
        """
        from .capture import CapturedTarget

        return CapturedTarget(self, ref, batch, runner)

    # ---- one episode, the published call ----
    @torch.no_grad()
    def predict_episode(self, ref_images: torch.Tensor, ref_masks: torch.Tensor, tgt_image: torch.Tensor,
                        out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Segment one target: ref_images (S, 3, H, W), ref_masks (S, H, W) bool, tgt_image (1, 3, H, W).

        All S + 1 images go through the backbone as one batch, as in the published code; the
        mask is resized to ``out_size`` (None: size x size).
        """
        S = check_image_batch("ref_images", ref_images)
        targets = check_image_batch("tgt_image", tgt_image)
        if targets != 1:
            if targets == 0:
                raise InputError(f"tgt_image must be one image (1, 3, H, W), got {tuple(tgt_image.shape)}")
            # The published predict_mask reads the first target of the batch (index S) only.
            warn_input(f"tgt_image holds {targets} images: the first is segmented, as in the published code; "
                       "segment several targets with segment_targets()")
            tgt_image = tgt_image[:1]
        if tuple(tgt_image.shape[-2:]) != tuple(ref_images.shape[-2:]):
            raise InputError(f"tgt_image is {tuple(tgt_image.shape[-2:])} px but ref_images are "
                             f"{tuple(ref_images.shape[-2:])}: they go through the backbone as one batch")
        if not isinstance(ref_masks, torch.Tensor) or ref_masks.ndim != 3 or ref_masks.shape[0] < S:
            got = tuple(ref_masks.shape) if isinstance(ref_masks, torch.Tensor) else type(ref_masks).__name__
            raise InputError(f"ref_masks must be a (S, H, W) tensor with one mask per reference image "
                             f"(S = {S}), got {got}")
        if ref_masks.shape[0] > S:  # the published code reads the masks of its S shots only
            warn_input(f"{ref_masks.shape[0]} reference masks for {S} reference images: the first {S} are used")
            ref_masks = ref_masks[:S]
        warn_non_finite(ref_images, "ref_images")
        warn_non_finite(tgt_image, "tgt_image")
        c = self.config  # one set of options for the whole episode (see segment)
        feats = self.features(torch.cat([ref_images.to(self.device), tgt_image.to(self.device)]), c)
        ref = self.encode_reference(ref_images, ref_masks, features=feats[:S], config=c)
        return self.segment(ref, tgt_image, [out_size], features=feats[S:], config=c)[0]

    # ---- keypoints ----
    @torch.no_grad()
    def match_keypoints(self, ref_image: torch.Tensor, ref_kps: torch.Tensor, tgt_image: torch.Tensor,
                        use_debiased: bool = True, ref_size: tuple[int, int] | None = None,
                        tgt_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Transfer keypoints (K, 2) (x, y) from ref_image (1, 3, H, W) to tgt_image; (K, 2) target pixels.

        ``ref_size``/``tgt_size``: the (H, W) the keypoints and the prediction are in (default:
        the tensors' own sizes). Keypoints with a NaN or infinite coordinate give NaN (with an
        ``InputWarning``).
        """
        try:
            kps = torch.as_tensor(ref_kps, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise InputError("keypoints must be a (K, 2) array of numbers (x, y), "
                             f"got {type(ref_kps).__name__}") from None
        if kps.ndim != 2 or kps.shape[-1] < 2 or kps.shape[0] == 0:
            raise InputError(f"keypoints must be a non-empty (K, 2) array of (x, y), got shape {tuple(kps.shape)}")
        if kps.shape[-1] > 2:  # e.g. (x, y, visibility): the published code reads x and y only
            warn_input(f"keypoints have {kps.shape[-1]} columns: the first two are read as (x, y)")
            kps = kps[:, :2]
        for name, image in (("ref_image", ref_image), ("tgt_image", tgt_image)):
            if check_image_batch(name, image) != 1:
                raise InputError(f"{name} must be one image (1, 3, H, W), got {tuple(image.shape)}")
        finite = torch.isfinite(kps).all(dim=1)
        out = torch.full_like(kps, float("nan"), device=self.device)
        if not bool(finite.all()):
            warn_input(f"{int((~finite).sum())} of {kps.shape[0]} keypoints have a non-finite coordinate; "
                       "their predictions are NaN")
            if not bool(finite.any()):
                return out
        ref_size = ref_size or tuple(ref_image.shape[-2:])
        tgt_size = tgt_size or tuple(tgt_image.shape[-2:])
        x, y = kps[:, 0], kps[:, 1]
        outside = finite & ((x < 0) | (x > ref_size[1]) | (y < 0) | (y > ref_size[0]))
        if bool(outside.any()):
            warn_input(f"{int(outside.sum())} of {kps.shape[0]} keypoints lie outside the reference image "
                       f"({ref_size[1]} x {ref_size[0]} px): each is read at its nearest edge patch, as published")
        feats = self.features(torch.cat([ref_image.to(self.device), tgt_image.to(self.device)]))
        if use_debiased:
            feats = debias(feats, self.projector)
        out[finite.to(self.device)] = transfer_keypoints(feats[0], feats[1], kps[finite].to(self.device),
                                                         ref_size, tgt_size).to(out.dtype)
        return out


#: The name the core had before it became a module; the same class.
Segmenter = Insid3Core
