"""The capturing processor: wraps a layer's original attention processor and records its attention.

The original processor runs untouched (SDPA, xformers, LoRA, IP-adapter, fused projections...);
the query and key are read where the processor hands them to its attention function
(``F.scaled_dot_product_attention`` or diffusers' ``dispatch_attention_fn``, wrapped in the
processor's module while a trace is active and scoped by a context variable to traced layer calls):
there they are final (QK-norm, rotary embeddings, fused projections applied) and come with the
model's own mask and scale. Processors that call no attention function (diffusers' classic
``AttnProcessor``, xformers; Sana's linear self-attention, weighed by its site's ``kernel``) are
read from forward hooks on ``attn.to_q`` / ``attn.to_k`` instead.
Joint-attention layers (SD3, Flux) can only be read at the attention function. Either way the call
goes to the recorder in one canonical form, and the layer's output is exactly the original one.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import threading
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TraceError
from ..storage.recorder import AttentionCall, mask_bias

if TYPE_CHECKING:
    from ..storage.recorder import Recorder
    from .families import AttentionSite


class CaptureHub:
    """What the capturing processors of one trace share: the current generation's recorder, whether
    this denoiser call is captured, and its step. The trace sets it; processors only read it."""

    def __init__(self) -> None:
        self.recorder: Recorder | None = None
        self.capturing = False
        self.step = 0
        #: the current denoiser call's rewrite of captured calls into the recorder's layout (Lumina 2)
        self.rewrite: Callable[[AttentionCall], AttentionCall] | None = None

    def active(self) -> Recorder | None:
        """The recorder to send calls to, or None when this call is not captured."""
        return self.recorder if self.capturing else None


class CapturingProcessor:
    """Wraps ``original`` for one attention site; transparent to diffusers' kwargs filtering."""

    def __init__(self, original: Any, site: AttentionSite, hub: CaptureHub) -> None:
        self.original = original
        self.site = site
        self.hub = hub
        # Attention.forward drops kwargs the processor's __call__ does not declare: advertise the
        # original's parameters so wrapping changes nothing about which kwargs reach it.
        try:
            sig = inspect.signature(original.__call__)
        except (TypeError, ValueError):
            sig = None
        if sig is not None:

            def _call(*args: Any, **kwargs: Any) -> Any:
                return type(self).__call__(self, *args, **kwargs)

            _call.__signature__ = sig  # type: ignore[attr-defined]
            self.__dict__["__call__"] = _call

    def __call__(self, attn: Any, *args: Any, **kwargs: Any) -> Any:
        recorder = self.hub.active()
        if recorder is None:
            return self.original(attn, *args, **kwargs)
        slot: dict[str, Any] = {}  # what the attention function received (see _recording)
        projected: dict[str, torch.Tensor] = {}  # to_q / to_k outputs: the read for processors without one

        def keep(key: str) -> Any:
            def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
                projected.setdefault(key, output)

            return hook

        handles = []
        if self.site.kind != "joint":  # a joint sequence is only whole where the attention function gets it
            for name in ("to_q", "to_k"):
                module = getattr(attn, name, None)
                if module is not None and callable(getattr(module, "register_forward_hook", None)):
                    handles.append(module.register_forward_hook(keep(name)))
        token = _SLOT.set(slot)
        try:
            out = self.original(attn, *args, **kwargs)
        finally:
            _SLOT.reset(token)
            for h in handles:
                h.remove()
        captured = self._canonical(attn, slot, projected, args, kwargs)
        if self.hub.rewrite is not None:
            captured = self.hub.rewrite(captured)
        recorder.record(captured, self.hub.step)
        return out

    def _canonical(
        self, attn: Any, slot: dict[str, Any], projected: dict[str, torch.Tensor], args: tuple, kwargs: dict
    ) -> AttentionCall:
        """The call as the attention function received it (q and k final: QK-norm, RoPE, fused
        projections, the model's own mask and scale), else from the projections."""
        site = self.site
        calls = slot.get("calls", [])
        if len(calls) > site.call:
            slot = calls[site.call]
            if slot["causal"]:
                raise TraceError(f"layer {site.name} runs causal attention, which daami2i does not expect")
            q, k = slot["q"], slot["k"]
            if slot["layout"] == "bshd":
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            bias = mask_bias(slot["mask"], (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
            scale = float(slot["scale"]) if slot["scale"] is not None else q.shape[-1] ** -0.5
            return AttentionCall(site.name, site.kind, site.factor, q, k, bias, scale)
        if calls:
            raise TraceError(
                f"layer {site.name} called its attention function {len(calls)} time(s), but its attention is read "
                f"at call {site.call + 1}: this layer's processor is not the one daami2i expects"
            )
        if site.kind == "joint":
            raise TraceError(
                f"the attention processor {type(self.original).__name__} of layer {site.name} called neither "
                "torch.nn.functional.scaled_dot_product_attention (as F) nor diffusers' dispatch_attention_fn, so "
                "its attention cannot be captured; use the model's default processor while tracing"
            )
        if "to_q" not in projected or "to_k" not in projected:
            raise TraceError(
                f"the attention processor {type(self.original).__name__} of layer {site.name} called no attention "
                "function daami2i reads (F.scaled_dot_product_attention, dispatch_attention_fn) and not "
                "attn.to_q / attn.to_k, so its attention cannot be captured; use the model's default processor "
                "while tracing"
            )
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        return projection_call(site, attn, projected["to_q"], projected["to_k"], mask)


@torch.no_grad()
def projection_call(site: AttentionSite, attn: Any, q: torch.Tensor, k: torch.Tensor, mask: Any) -> AttentionCall:
    """The canonical call of a layer whose ``to_q`` / ``to_k`` outputs were read: ``q`` (B, N, heads*d)
    and ``k`` (B, T, heads*d) split into heads, QK-normalised as the layer does (a norm across all
    heads before the split, a per-head one after it), its mask prepared by the layer itself into an
    additive bias, its own scale; the site's kernel (linear attention takes no mask)."""
    heads = attn.heads
    b, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
    d = q.shape[-1] // heads
    norm_q, norm_k = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
    if norm_q is not None and heads > 1 and _norm_width(norm_q) == q.shape[-1]:  # across heads
        q, norm_q = norm_q(q), None
    if norm_k is not None and heads > 1 and _norm_width(norm_k) == k.shape[-1]:
        k, norm_k = norm_k(k), None
    q4 = q.view(b, n_q, heads, d).transpose(1, 2)
    k4 = k.view(b, n_k, heads, d).transpose(1, 2)
    if norm_q is not None:
        q4 = norm_q(q4)
    if norm_k is not None:
        k4 = norm_k(k4)
    kernel = getattr(site, "kernel", "softmax")
    bias = None
    if mask is not None and kernel == "softmax":
        full = attn.prepare_attention_mask(mask, n_k, b)  # (b * heads, 1 or N, T)
        bias = full.view(b, heads, full.shape[-2], full.shape[-1]).float()
    return AttentionCall(site.name, site.kind, site.factor, q4, k4, bias, float(attn.scale), kernel)


def _norm_width(norm: Any) -> int | None:
    """The last-dimension width a QK-norm module normalises (LayerNorm, diffusers' RMSNorm), if known."""
    shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
    if isinstance(shape, int):
        return shape
    return int(shape[-1]) if isinstance(shape, (tuple, list, torch.Size)) and len(shape) else None


# -- joint attention (SD3, Flux): q and k where the processor hands them to the attention function ----
_SLOT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("daami2i_attention_slot", default=None)


def _sdpa_signature(
    query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
    scale: Any = None, enable_gqa: bool = False,
) -> None:  # fmt: skip
    """The documented signature of ``torch.nn.functional.scaled_dot_product_attention`` (a builtin)."""


def _recording(original: Callable[..., Any], layout: str, like: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """``original`` (an attention function taking query, key, value first), recording each call's
    query, key, mask and scale into the active slot (the site says which call is its attention);
    layout ``"bhsd"`` (SDPA) or ``"bshd"`` (diffusers'
    ``dispatch_attention_fn``). Outside a traced layer call it is a plain pass-through. ``like`` gives
    the signature when ``original`` has none (builtins)."""
    sig = inspect.signature(like or original)

    def attention(*args: Any, **kwargs: Any) -> Any:
        slot = _SLOT.get()
        if slot is not None:
            bound = sig.bind(*args, **kwargs)
            a = bound.arguments
            slot.setdefault("calls", []).append(
                dict(
                    q=a["query"],
                    k=a["key"],
                    mask=a.get("attn_mask"),
                    scale=a.get("scale"),
                    causal=bool(a.get("is_causal", False)),
                    layout=layout,
                )
            )
        return original(*args, **kwargs)

    attention.__wrapped__ = original  # type: ignore[attr-defined]
    return attention


class _FunctionalProxy(types.ModuleType):
    """``torch.nn.functional`` with a recording ``scaled_dot_product_attention`` (set as a module's ``F``)."""

    def __init__(self, base: types.ModuleType) -> None:
        super().__init__(base.__name__)
        self._base = base
        self.scaled_dot_product_attention = _recording(base.scaled_dot_product_attention, "bhsd", _sdpa_signature)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def attention_function_targets(processors: list[Any]) -> list[tuple[Any, str]]:
    """``(module, attribute)`` of the attention functions the processors' modules call: diffusers'
    ``dispatch_attention_fn`` and ``F`` (for ``F.scaled_dot_product_attention``)."""
    out: list[tuple[Any, str]] = []
    seen: set[str] = set()
    for proc in processors:
        name = type(proc).__module__
        mod = sys.modules.get(name)
        if mod is None or name in seen:
            continue
        seen.add(name)
        if callable(getattr(mod, "dispatch_attention_fn", None)):
            out.append((mod, "dispatch_attention_fn"))
        f = getattr(mod, "F", None)
        if f is torch.nn.functional or isinstance(f, _FunctionalProxy):
            out.append((mod, "F"))
    return out


# installed recording wrappers, shared by every active trace: (module name, attribute) ->
# [module, original value, number of traces using it]; the original is put back by the last one
_INSTALLED: dict[tuple[str, str], list[Any]] = {}
_INSTALL_LOCK = threading.Lock()


def acquire_attention_patches(processors: list[Any]) -> list[tuple[str, str]]:
    """Install (or share) the recording wrappers for these processors; returns keys for the release."""
    keys = []
    with _INSTALL_LOCK:
        for mod, attr in attention_function_targets(processors):
            key = (mod.__name__, attr)
            entry = _INSTALLED.get(key)
            if entry is None:
                original = getattr(mod, attr)
                if attr == "F":
                    wrapper: Any = _FunctionalProxy(original)
                else:
                    wrapper = _recording(original, "bshd")
                setattr(mod, attr, wrapper)
                _INSTALLED[key] = [mod, original, 1]
            else:
                entry[2] += 1
            keys.append(key)
    return keys


def release_attention_patches(keys: list[tuple[str, str]]) -> None:
    """Undo :func:`acquire_attention_patches` (the originals come back when no trace uses them)."""
    with _INSTALL_LOCK:
        for key in keys:
            entry = _INSTALLED.get(key)
            if entry is None:
                continue
            entry[2] -= 1
            if entry[2] <= 0:
                setattr(entry[0], key[1], entry[1])
                del _INSTALLED[key]


class JointCapturingProcessor(CapturingProcessor):
    """The wrapper of a joint-attention layer (SD3, Flux, Chroma): its q and k can only be read where
    the processor hands the whole joint sequence to its attention function."""
