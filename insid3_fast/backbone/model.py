"""The timm DINOv3 model: building it, loading Meta-layout weights into it, pinning its RoPE
periods, and Meta's ``get_intermediate_layers`` interface over it.

The RoPE pinning subclasses timm's ``RotaryEmbeddingDinoV3``, overrides its private
``_compute_periods`` (which ``_init_buffers`` and, after a dtype cast, ``_apply`` call) and calls
its private ``_init_buffers``: `TIMM_REQUIREMENT` (and pyproject.toml) names the timm releases
this was checked against.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import BackendError, InputError, WeightsError
from ..inputs import PATCH_SIZE
from .keys import is_ignored
from .messages import few, unknown_architecture_error
from .sizes import MODEL_SIZES

__all__ = [
    "TIMM_REQUIREMENT", "DinoV3Backbone", "build_dinov3", "cache_rope_embeddings", "cached_rope_class", "load_weights",
    "pin_rope_periods", "pinned_rope_class",
]

#: The timm releases the RoPE pinning was checked against; pyproject.toml requires the same
#: (tests/test_backbone.py holds the two equal). Raise it only after tests/test_backbone.py passes
#: on the new release: the pinning overrides private timm methods.
TIMM_REQUIREMENT = "timm>=1.0.25,<=1.0.31"
# The private RotaryEmbeddingDinoV3 methods the pinning relies on.
_TIMM_HOOKS = ("_compute_periods", "_init_buffers")

# The grid shapes (image sizes) whose RoPE embeddings a backbone keeps (cached_rope_class).
_ROPE_CACHED_SHAPES = 8
_ROPE_LOCK = threading.Lock()

# Where pickle finds the lazily built RoPE class: the package, whose __getattr__ builds it. It
# is also where the class lived before the package was split, so older pickles still load.
_PICKLE_MODULE = "insid3_fast.backbone"


@functools.cache
def cached_rope_class() -> type:
    """timm's DINOv3 RoPE that computes its embedding once per grid shape, device and dtype
    (one class, built on first use), in no-grad and inference passes.

    timm rebuilds the embedding in every forward from a coordinate grid made on the CPU (for
    its numerics), so each pass on a GPU copied that grid from pageable memory, which makes the
    host wait for the stream and cannot be captured into a CUDA graph at all. The cached
    embedding is the one timm computes, bit for bit. Passes with gradients, training-time
    coordinate augmentation and an explicit ``dtype`` take timm's path; under torch.compile the
    lookup runs eagerly, between two compiled graphs that hold no host work (so a compile with
    ``fullgraph=True`` refuses it: compile without). The last ``_ROPE_CACHED_SHAPES`` grid
    shapes are kept. The embedding is shared, not a copy: callers must not edit it in place
    (timm's own code does not).
    """
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    class _CachedEmbedRope(RotaryEmbeddingDinoV3):
        """timm's DINOv3 RoPE with its per-shape embedding cached (see ``cached_rope_class``)."""

        def get_embed(self, shape: Sequence[int] | None = None, *args: Any, **kwargs: Any) -> Tensor:
            if (shape is None or args or kwargs.get("dtype") is not None or torch.is_grad_enabled()
                    or (self.training and getattr(self, "aug_active", False))):
                return super().get_embed(shape, *args, **kwargs)
            return self._cached_embed(tuple(int(s) for s in shape))

        # Eager under torch.compile too (a graph break): traced, timm's host-side grid would sit
        # in the compiled graph, and inductor makes no CUDA graph of a graph with host ops.
        @torch.compiler.disable
        def _cached_embed(self, shape: tuple[int, ...]) -> Tensor:
            # The embeddings belong to one periods tensor as it is now: another one (assigned,
            # or substituted by torch.func.functional_call), new values (an in-place edit), a
            # move or a cast start a new cache.
            periods = self.periods
            stamp = (periods.device, periods.dtype, _version_of(periods))
            with _ROPE_LOCK:  # one model may serve several threads
                state = self.__dict__.get("_embeds")
                if state is None or state[0]() is not periods or state[1] != stamp:
                    state = self.__dict__["_embeds"] = (weakref.ref(periods), stamp, {})
                embeds = state[2]
                embed = embeds.pop(shape, None)
                if embed is None:
                    embed = super().get_embed(list(shape))
                    while len(embeds) >= _ROPE_CACHED_SHAPES:  # the least recently used goes
                        embeds.pop(next(iter(embeds)))
                embeds[shape] = embed
                return embed

        def cached_tensors(self) -> tuple[Tensor, ...]:
            """The cached embeddings: a CUDA graph that read one must keep it alive."""
            with _ROPE_LOCK:
                state = self.__dict__.get("_embeds")
                return tuple(state[2].values()) if state is not None else ()

        def _init_buffers(self) -> None:
            self.__dict__.pop("_embeds", None)  # new periods: new embeddings
            super()._init_buffers()

        def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
            self.__dict__.pop("_embeds", None)  # moved or cast: computed again where the periods are
            return super()._apply(fn, recurse)

        def __getstate__(self) -> dict[str, Any]:
            state = super().__getstate__()
            state.pop("_embeds", None)
            return state

    _CachedEmbedRope.__qualname__ = _CachedEmbedRope.__name__
    _CachedEmbedRope.__module__ = _PICKLE_MODULE
    return _CachedEmbedRope


def cache_rope_embeddings(model: nn.Module) -> None:
    """Give a timm DINOv3 ``model``'s RoPE the per-shape embedding cache of ``cached_rope_class``
    (a pinned one has it already; another RoPE class is left as it is)."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    rope = getattr(model, "rope", None)
    if type(rope) is RotaryEmbeddingDinoV3:
        rope.__class__ = cached_rope_class()


@functools.cache
def pinned_rope_class() -> type:
    """timm's DINOv3 RoPE with fixed periods and a cached embedding (one class, built on first use)."""
    # Built lazily: importing timm costs seconds, and only loading a model needs it.
    import timm
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    missing = [name for name in _TIMM_HOOKS if not callable(getattr(RotaryEmbeddingDinoV3, name, None))]
    if missing:
        raise BackendError(
            f"timm {timm.__version__} lacks RotaryEmbeddingDinoV3.{', .'.join(missing)}, through which "
            "insid3_fast pins the RoPE periods to the checkpoint's values: install a timm release it was "
            f"checked against (pip install '{TIMM_REQUIREMENT}')."
        )

    class _PinnedPeriodsRope(cached_rope_class()):
        """timm's DINOv3 RoPE whose periods are fixed values instead of recomputed ones."""

        _pinned_periods: Tensor

        def _compute_periods(
            self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
        ) -> Tensor:
            # timm rebuilds periods in float32 from the formula on init and after a downcast;
            # Meta's checkpoints carry bf16-rounded ones, which are what Meta's code uses.
            return self._pinned_periods.to(device=device, dtype=dtype)

    _PinnedPeriodsRope.__qualname__ = _PinnedPeriodsRope.__name__
    _PinnedPeriodsRope.__module__ = _PICKLE_MODULE
    return _PinnedPeriodsRope


def pin_rope_periods(model: nn.Module, periods: Tensor) -> None:
    """Make ``model.rope`` use ``periods`` now and after any later dtype/device cast."""
    rope = model.rope
    rope.__class__ = pinned_rope_class()
    rope._pinned_periods = periods.detach().to(device="cpu", dtype=torch.float32).clone()
    with torch.no_grad():
        rope._init_buffers()


def build_dinov3(model_size: str, **timm_kwargs: Any) -> nn.Module:
    """A randomly initialised timm DINOv3 model of ``model_size`` (a key of MODEL_SIZES), with
    no classifier head unless ``num_classes`` is given; ``timm_kwargs`` (depth, embed_dim,
    num_heads, ...) override the size's defaults."""
    import timm

    if model_size not in MODEL_SIZES:
        raise unknown_architecture_error(f"model_size '{model_size}'")
    timm_kwargs.setdefault("num_classes", 0)
    return timm.create_model(MODEL_SIZES[model_size], pretrained=False, **timm_kwargs)


class DinoV3Backbone(nn.Module):
    """A timm DINOv3 ViT behind Meta's ``get_intermediate_layers`` interface."""

    def __init__(self, model: nn.Module, model_size: str) -> None:
        super().__init__()
        cache_rope_embeddings(model)
        self.model = model
        self.model_size = model_size
        self.patch_size = PATCH_SIZE
        self.embed_dim = int(model.embed_dim)
        self.n_blocks = len(model.blocks)
        self.num_heads = int(model.blocks[0].attn.num_heads)
        self.n_storage_tokens = int(model.num_prefix_tokens) - 1
        # (file key, a weak reference and version per parameter and buffer) of the weights it
        # was loaded with; see weights_fingerprint.
        self._weights_mark: tuple[str, tuple[tuple[weakref.ref, int | None], ...]] | None = None

    def _weight_tensors(self) -> tuple[Tensor, ...]:
        return (*self.parameters(), *self.buffers())

    def _marked_key(self) -> str | None:
        """The file key of the mark while every tensor is the marked one, unchanged; else None."""
        mark = self._weights_mark
        if mark is None:
            return None
        key, marked = mark
        current = self._weight_tensors()
        if len(current) != len(marked):
            return None
        for (ref, version), t in zip(marked, current):
            if ref() is not t or version != _version_of(t):
                return None
        return key

    @property
    def weights_fingerprint(self) -> str | None:
        """The positional-basis cache key of the weights file this backbone was loaded from
        (``load_dinov3``) and of its parameters' current dtype; None when it was not loaded from
        a file, or once any parameter or buffer was loaded or modified in place or replaced (a
        key kept past that would serve the positional basis of other weights).

        Changes are seen through the tensors' identities and version counters (identities only
        for inference-mode tensors, which have none); moving or casting the backbone keeps the
        key (the dtype is part of it). Not seen: an assignment to a tensor's ``.data``. A copy
        (deepcopy, pickle) has no key.
        """
        key = self._marked_key()
        if key is None:
            return None
        first = next(self.parameters(), None)
        return f"{key}|{first.dtype if first is not None else None}"

    @weights_fingerprint.setter
    def weights_fingerprint(self, key: str | None) -> None:
        """Mark the current weights as those of ``key`` (a ``weights_fingerprint`` of their file)."""
        # Weak references: a replaced tensor must not be kept alive by the mark.
        self._weights_mark = None if key is None else (
            key, tuple((weakref.ref(t), _version_of(t)) for t in self._weight_tensors()))

    def _apply(self, fn: Any, recurse: bool = True) -> "DinoV3Backbone":
        # .to() / .half() / .cuda() give buffers (and, with torch's overwrite-on-conversion flag,
        # parameters) new tensors of the same weights: the mark follows them.
        key = self._marked_key()
        out = super()._apply(fn, recurse)
        if key is not None:
            self.weights_fingerprint = key
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_weights_mark"] = None  # weak references do not pickle, and a copy's tensors are others
        return state

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = True,
        norm: bool = True,
    ) -> tuple[Tensor, ...]:
        """Patch tokens of the last ``n`` blocks (or of the blocks listed in ``n``), after the
        final LayerNorm when ``norm``, CLS and storage tokens dropped: (B, C, h, w) tensors when
        ``reshape`` else (B, h*w, C). ``x`` is (B, 3, H, W); h = H // 16, w = W // 16 (the last
        rows and columns of sizes that are not multiples of 16 are not seen, as in Meta's model)."""
        if x.ndim != 4:
            raise InputError(f"expected an image batch of shape (B, 3, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height < self.patch_size or width < self.patch_size:
            raise InputError(f"image size {height}x{width} is smaller than one {self.patch_size} px patch")
        # Meta's patch embedding is a stride-16 convolution, which never reads the last
        # height % 16 rows and width % 16 columns; timm's refuses such sizes: crop them here.
        x = x[..., : height - height % self.patch_size, : width - width % self.patch_size]
        param = self.model.patch_embed.proj.weight
        indices = n if isinstance(n, int) else list(n)
        outputs = self.model.forward_intermediates(
            x.to(device=param.device, dtype=param.dtype),
            indices=indices,
            norm=norm,
            stop_early=True,
            output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
        )
        return tuple(outputs)

    def forward(self, x: Tensor) -> Tensor:
        """The last block's normalised patch features, (B, C, H/16, W/16)."""
        return self.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]


def _version_of(t: Tensor) -> int | None:
    """A tensor's version counter; None for inference-mode tensors, which keep none."""
    return None if t.is_inference() else t._version


def _effective_k_biases(state: Mapping[str, Tensor]) -> dict[int, Tensor]:
    """Per block, the key bias Meta's attention really adds: ``qkv.bias * bias_mask``."""
    biases = {}
    for key, bias in state.items():
        if key.startswith("blocks.") and key.endswith(".attn.qkv.bias"):
            mask = state.get(key + "_mask")
            effective = bias if mask is None else bias * mask.to(bias.dtype)
            biases[int(key.split(".")[1])] = effective.chunk(3)[1]
    return biases


def load_weights(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a checked Meta-layout ``state`` into a timm DINOv3 ``model`` (through timm's converter;
    every key must fit), keeping the key bias Meta's attention really adds."""
    from timm.models.eva import checkpoint_filter_fn

    kept = {k: v for k, v in state.items() if not is_ignored(k)}
    try:
        filtered = checkpoint_filter_fn(kept, model)
        result = model.load_state_dict(filtered, strict=False)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:  # shape mismatches
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise WeightsError(
            f"The checkpoint's tensor shapes do not match the DINOv3 model ({few(lines, 3) or exc}). "
            "Check model_size or re-download the weights."
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            "The checkpoint does not fit the timm DINOv3 model (missing: "
            f"{few(result.missing_keys) or 'none'}; unexpected: {few(result.unexpected_keys) or 'none'})."
        )
    # timm drops the key bias (zero in Meta's releases, which mask it); keep it when it is not,
    # since RoPE rotates it and it then changes the attention.
    with torch.no_grad():
        for idx, k_bias in _effective_k_biases(state).items():
            model.blocks[idx].attn.k_bias.copy_(k_bias)
