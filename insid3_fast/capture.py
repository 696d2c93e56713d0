"""One CUDA graph per target: a fixed-shape target batch, captured once, replayed per call.

``Insid3Core.capture(ref)`` (and ``INSID3.capture``) records the whole per-target work, from the
normalised image to the (size, size) mask: the backbone pass, SPEC steps 3-7 and the bilinear
upsampling, on static buffers. Each call then copies the images into the static input, replays
the graph and returns a copy of the static output: no Python per op, no launch overhead, and no
host synchronisation between the image and the mask (the post-backbone ops skip their host-side
input checks while a stream is captured, see ``csrc/cuda/cuda_utils.cuh``).

The graph is a ``torch.cuda.CUDAGraph`` (``CudaGraphRunner``); any object with the same
``capture``/``replay`` pair can stand in for it (the tests run the captured call on the CUDA
emulation with one that re-runs the recorded function).
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch

from .errors import InputError
from . import pipeline
from .inputs import check_int, check_out_size
from .refine import upsample_mask

if TYPE_CHECKING:
    from .core import Insid3Core
    from .pipeline import EncodedReference


class GraphRunner(Protocol):
    """Records a function once and re-executes it on the same buffers.

    A runner may also have ``ordered()``, a context manager that each call's copy in, replay
    and read out run inside (``CudaGraphRunner``: on the graph's device, after the previous
    call's work whatever stream that ran on).
    """

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record ``fn``; return its output, the static buffer every replay writes."""

    def replay(self) -> None:
        """Re-execute what was recorded."""


# One capture at a time in the process (torch's inductor serialises its captures the same way).
_CAPTURE_LOCK = threading.Lock()


class CudaGraphRunner:
    """A ``torch.cuda.CUDAGraph``: ``warmup`` eager runs on a side stream, then one capture.

    The warm-up runs let lazy initialisation (cuBLAS handles, the caching allocator's first
    blocks, autotuning) happen outside the graph, as ``torch.cuda.graphs`` recommends. The
    capture is thread-local (``capture_error_mode="thread_local"``): other threads may go on with
    eager work meanwhile (their host reads and allocations would invalidate a global capture and
    fail themselves); captures of several threads are serialised.
    """

    def __init__(self, device: torch.device, warmup: int = 2) -> None:
        self.device = device
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._done: torch.cuda.Event | None = None  # the end of the last call's work

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Warm up, then record ``fn`` into a new graph; its output is the static output."""
        # On the model's device, whichever is current: torch.cuda.graph's default capture
        # stream lives on the device that was current when the process first captured.
        with _CAPTURE_LOCK, torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn()
            current.wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device),
                                  capture_error_mode="thread_local"):
                out = fn()
        return out

    @contextlib.contextmanager
    def ordered(self) -> Iterator[None]:
        """One call's work on the graph's device, after the previous call's (the static buffers
        are shared: a call from another stream must not overwrite them before that one is read)."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            if self._done is not None:
                current.wait_event(self._done)
            yield
            self._done = torch.cuda.Event()
            self._done.record(current)

    def replay(self) -> None:
        """Launch the recorded graph on the current stream."""
        assert self.graph is not None, "capture() first"
        self.graph.replay()


class CapturedTarget:
    """Segment ``batch`` targets of a fixed reference by one graph replay; see ``Insid3Core.capture``.

    Call it with normalised images (batch, 3, size, size) (or (3, size, size) when ``batch`` is
    1), on any device: a bool mask (batch, size, size) (or (size, size)) on the model's device,
    a copy that later calls do not overwrite. Calls from several threads (or CUDA streams) are
    served one at a time. A target whose features are not finite (NaN or inf pixels) gets an
    empty mask, decided on the device (eagerly the ops raise instead, on every backend). The
    graph holds the reference and the model's thresholds, buffers and weights as they were at
    capture: after ``reconfigure``, moving or casting the model, or replacing its positional basis
    (``set_basis``, or ``load_state_dict`` with another basis) a call is refused; capture again.
    Encoder weights loaded in place (``load_state_dict``) are read by the next replay.
    """

    def __init__(self, core: "Insid3Core", ref: "EncodedReference", batch: int = 1,
                 runner: GraphRunner | None = None) -> None:
        self.core = core
        self.ref = core.check_reference(ref)
        self.batch = check_int("batch", batch, minimum=1)
        # The options the graph holds, read once: the checks below and the recorded work see the
        # same ones (reconfigure() replaces core.config, and a call after that is refused).
        self.config = config = core.config
        if config.mask_refiner == "crf":
            raise InputError("a captured call cannot run the CRF (it runs on the host): use "
                             "mask_refiner='bilinear', or segment() for CRF masks")
        if config.compile in ("reduce-overhead", "max-autotune"):
            raise InputError(f"compile={config.compile!r} records CUDA graphs of its own, which cannot "
                             "run inside the captured call's graph: build the model with compile=True "
                             "(or 'max-autotune-no-cudagraphs') to capture it")
        if core._kernels_of(config) != "native":
            raise InputError("a captured call needs the native kernels (the reference kernels run scikit-learn "
                             "on the host): core.reconfigure(backend='native'), or build the model with backend='native' "
                             "('auto' falls back to the reference kernels where the extension is not built)")
        if runner is None:
            if core.device.type != "cuda":
                raise InputError(f"capture() records a CUDA graph and needs a CUDA model, this one is on "
                                 f"{core.device}: use segment() / stream() there")
            runner = CudaGraphRunner(core.device)
        # The graph holds raw pointers to the buffers and weights, not references: moving or
        # casting the model frees them, and a replay would read freed memory.
        params = list(core.encoder.parameters())
        self._watched = (params[0], params[-1]) if params else ()
        # Every tensor the graph may read stays allocated while this call lives, even if the
        # model drops it (a parameter replaced or cast that the sampled check below misses):
        # a replay then reads stale weights, never freed memory.
        self._alive = (core.complement, core.basis, *(p.data for p in params), *core.encoder.buffers())
        self._lock = threading.Lock()
        self._storage = self._storage_of()
        size = core.image_size
        self.shape = (self.batch, 3, size, size)
        self.images = torch.zeros(self.shape, device=core.device, dtype=core.dtype)
        self.runner = runner
        with torch.no_grad():
            self.masks = runner.capture(self._forward)
        # ... and so do the tensors that modules cache outside their buffers, which the warm-up
        # runs computed (the RoPE embeddings, insid3_fast.backbone.model.cached_rope_class).
        self._alive += tuple(t for m in core.encoder.modules() for t in getattr(m, "cached_tensors", tuple)())

    def _storage_of(self) -> tuple:
        """Where the tensors the graph reads live: device, dtype and the first bytes of the
        debiasing buffers and of the encoder's first and last parameter.

        A sample, not all of them: this runs before every replay, and collecting the pointers of
        a ViT-L's few hundred tensors would cost the Python time the graph exists to remove.
        Moving or casting the model (or its encoder) reallocates every one of them; the
        parameter objects stay (``Module._apply`` swaps their data), so they are held here, and
        the first one's identity is compared too (with torch's overwrite-on-conversion flag set,
        ``_apply`` makes new parameter objects).
        """
        core = self.core
        first = next(core.encoder.parameters(), None)
        return (core.device, core.dtype, core.complement.data_ptr(), core.basis.data_ptr(), id(first),
                *(p.data_ptr() for p in self._watched))

    def _forward(self) -> torch.Tensor:
        """The recorded work: static images -> static (batch, size, size) masks."""
        core = self.core
        feats = core.features(self.images, self.config)
        # The ops' host-side finiteness checks are off under capture: a target whose features are
        # not finite (a NaN pixel) is segmented as zeros instead and its mask emptied on the
        # device, so the kernels only ever see finite input, without a host read (``segment``
        # gives such a target the same empty mask after one host read, as the published code does).
        ok = pipeline.finite_targets(feats)
        feats = feats.masked_fill(~ok[:, None, None, None], 0.0)
        masks = torch.stack([core.finalize(core.segment_patches(self.ref, feats[b], self.config), None, None,
                                           self.config)
                             for b in range(self.batch)])
        return masks & ok[:, None, None]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The masks of ``images`` (one replay); see the class docstring for the shapes.

        ``out_size`` (H, W): resize the masks to it after the replay (as ``segment`` does for
        ``resize_to_orig_size``); None: the model's size x size.
        """
        if self.core.config is not self.config:
            raise InputError("the model was reconfigured after this call was captured (its thresholds are "
                             "recorded in the graph): capture it again")
        if self.core.basis_version != self.ref.basis_version:
            raise InputError("the model's positional basis was replaced after this call was captured (set_basis, "
                             "or load_state_dict with another basis): encode the reference again and capture again")
        if self._storage_of() != self._storage:
            raise InputError("the model was moved, cast or reloaded after this call was captured (the graph "
                             "reads the old weights' memory): capture it again")
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise InputError(f"a captured call takes a normalised float image tensor {self.shape}, got "
                             f"{getattr(images, 'dtype', type(images).__name__)}")
        single = images.dim() == 3 and self.batch == 1
        batch = images[None] if single else images
        if tuple(batch.shape) != self.shape:
            raise InputError(f"this call was captured for images of shape {self.shape} (fixed shapes), got "
                             f"{tuple(images.shape)}: capture another for this shape")
        out_size = check_out_size(out_size)
        # One call at a time: the input and output buffers are the graph's own.
        with self._lock, getattr(self.runner, "ordered", contextlib.nullcontext)():
            self.images.copy_(batch, non_blocking=self.images.is_cuda)  # towards a GPU only (see to_device)
            self.runner.replay()
            if out_size is None:
                out = self.masks.clone()
            else:
                out = torch.stack([upsample_mask(m, *out_size) for m in self.masks])
        return out[0] if single else out
