"""Exact sample-specific composed forward of an open_clip ViT (METHOD.md §6).

Image ``n`` is encoded with weights ``θ0 + Σ_t Σ_b coef[n, t, b] · τ_t^(b)`` without building one weight copy
per sample. Every parameter enters the ViT linearly, so a linear layer is
``x W(λ_n)ᵀ = x W0ᵀ + Σ_t λ[n, t] · (x ΔW_tᵀ)``: one extra GEMM per task vector that is non-zero for some
sample of the batch in that layer's block (none for a block that is zero everywhere), over only the samples
where it is non-zero (gathered, multiplied, scattered back) when that is cheaper. With a low-rank bank the
extra GEMMs use the factors, ``x ΔW_tᵀ = (x B_tᵀ) A_tᵀ``, all task vectors in two GEMMs. Small tensors
(LayerNorm affine, biases, embeddings, LayerScale) are formed per sample. Without autograd, a layer with
many active task vectors may instead form its per-sample weights a few samples at a time, when that is
cheaper; a batch that shares one coefficient set (``[T, B]``, or ``[N, T, B]`` expanded from one) is merged
once per layer, under autograd too. All give the same numbers up to float rounding.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import (
    CustomResidualAttentionBlock,
    LayerNorm,
    LayerNormFp32,
    LayerScale,
    ResidualAttentionBlock,
    VisionTransformer,
)
from torch import nn

from vtvc_pyro.task_vectors import TaskVectorBank

MODES = ("auto", "composed", "sparse", "materialise")
# The per-layer cost model of mode="auto", in multiply-adds per weight element and sample. A task vector's
# extra GEMM costs ``L`` (L tokens) per sample it runs on; gathering a sample's rows and scattering its output
# back costs ``_GATHER_COST · (1/in + 1/out)`` times that; forming one sample's weights (memory-bound) costs
# ``_MATERIALISE_COST``, and its per-sample GEMM ``L / 4`` more than one shared GEMM. Measured on the 2-core
# x86 CPU (benchmarks/compose.py --calibrate, benchmarks/README.md): forming weights 50-64; the gather
# overhead was below the timing noise at ViT-B width, so 30 is a conservative bound (it only makes a layer
# skip gathering for a task vector used by nearly every sample, or in narrow layers).
_MATERIALISE_COST = 64.0
_GATHER_COST = 30.0
_CHUNK_ELEMENTS = 1 << 24  # per-sample weights formed at a time (64 MB in float32)


@dataclass(frozen=True)
class _Norm:
    prefix: str  # "ln_pre", "transformer.resblocks.0.ln_1", ...
    eps: float
    fp32: bool  # open_clip's LayerNormFp32: normalise in float32, cast back


@dataclass(frozen=True)
class _Block:
    prefix: str
    heads: int
    ln_1: _Norm
    ln_2: _Norm
    act: nn.Module  # parameter-free activation (nn.GELU, QuickGELU, ...)
    ls_1: bool  # LayerScale after attention / after the MLP
    ls_2: bool
    in_bias: bool
    out_bias: bool


@dataclass(frozen=True)
class _Tower:
    """The architecture of a supported open_clip VisionTransformer; the weights come from the bank."""

    patch: tuple[int, int]
    tokens: int  # patches + class token
    ln_pre: _Norm | None
    blocks: tuple[_Block, ...]
    ln_post: _Norm
    pool_type: str
    final_ln_after_pool: bool
    proj: bool


def _norm(module: nn.Module, prefix: str, width: int) -> _Norm:
    if type(module) not in (nn.LayerNorm, LayerNorm, LayerNormFp32):
        raise _unsupported(f"{prefix} is a {type(module).__name__}, not a LayerNorm")
    if tuple(module.normalized_shape) != (width,) or module.weight is None or module.bias is None:
        raise _unsupported(f"{prefix} is not an affine LayerNorm over {width} features")
    return _Norm(prefix, float(module.eps), type(module) is LayerNormFp32)


def _unsupported(feature: str) -> ValueError:
    return ValueError(f"ComposedEncoder does not support this tower feature: {feature}")


def _read_block(block: nn.Module, prefix: str, width: int) -> _Block:
    if isinstance(block, CustomResidualAttentionBlock):
        attn = block.attn
        flags = {"qk_norm": not isinstance(attn.ln_q, nn.Identity),
                 "scaled_cosine_attn": attn.logit_scale is not None,
                 "scale_heads": attn.head_scale is not None,
                 "scale_attn_inner": not isinstance(attn.ln_inner, nn.Identity),
                 "scale_attn": not isinstance(block.ln_attn, nn.Identity),
                 "scale_fc": not isinstance(block.mlp.ln, nn.Identity)}
        named = [k for k, on in flags.items() if on]
        raise _unsupported(f"{prefix} is a CustomResidualAttentionBlock (block_type='custom'"
                           + (f", {', '.join(named)}" if named else "") + ")")
    if type(block) is not ResidualAttentionBlock:
        raise _unsupported(f"{prefix} is a {type(block).__name__}, not a ResidualAttentionBlock")
    if hasattr(block, "ln_1_kv"):
        raise _unsupported(f"{prefix} is a cross-attention block")
    attn = block.attn
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        raise _unsupported(f"{prefix}.attn uses separate q/k/v projections, bias_k/bias_v or add_zero_attn")
    if attn.embed_dim != width:
        raise _unsupported(f"{prefix}.attn has embed_dim {attn.embed_dim} != width {width}")
    if attn.dropout > 0:
        raise _unsupported(f"{prefix}.attn attention dropout ({attn.dropout})")
    layer_scale = []
    for name in ("ls_1", "ls_2"):
        ls = getattr(block, name)
        if not isinstance(ls, (LayerScale, nn.Identity)):
            raise _unsupported(f"{prefix}.{name} is a {type(ls).__name__}")
        layer_scale.append(isinstance(ls, LayerScale))
    mlp = block.mlp
    if list(mlp._modules) != ["c_fc", "gelu", "c_proj"] or not all(
            type(mlp[i]) is nn.Linear for i in (0, 2)):
        raise _unsupported(f"{prefix}.mlp is not c_fc -> activation -> c_proj")
    act = mlp.gelu
    if any(True for _ in act.parameters()) or any(True for _ in act.buffers()):
        raise _unsupported(f"{prefix}.mlp.gelu ({type(act).__name__}) has parameters or buffers")
    if mlp.c_fc.bias is None or mlp.c_proj.bias is None:
        raise _unsupported(f"{prefix}.mlp linear layers without bias")
    ln_1, ln_2 = _norm(block.ln_1, f"{prefix}.ln_1", width), _norm(block.ln_2, f"{prefix}.ln_2", width)
    return _Block(prefix, attn.num_heads, ln_1, ln_2, act, *layer_scale, attn.in_proj_bias is not None,
                  attn.out_proj.bias is not None)


def _read_tower(visual: nn.Module) -> _Tower:
    """Read the architecture of ``visual``; raise naming the first feature the composed forward lacks."""
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"ComposedEncoder needs an open_clip VisionTransformer (model.visual), "
                        f"got {type(visual).__name__}")
    if visual.attn_pool is not None or getattr(visual, "attn_pool_contrastive", None) is not None:
        raise _unsupported("attentional pooler (attentional_pool=True)")
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise _unsupported(f"patch dropout (prob={visual.patch_dropout.prob})")
    if visual.pool_type not in ("tok", "avg"):
        raise _unsupported(f"pool_type={visual.pool_type!r} (supported: 'tok', 'avg')")
    if visual.output_tokens:
        raise _unsupported("output_tokens=True")
    if not isinstance(visual.transformer.resblocks, nn.ModuleList) or not visual.transformer.resblocks:
        raise _unsupported("a transformer without residual blocks")
    conv = visual.conv1
    if type(conv) is not nn.Conv2d or conv.kernel_size != conv.stride or conv.padding != (0, 0) \
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.bias is not None:
        raise _unsupported("conv1 is not a bias-free patch-embedding convolution (kernel = stride)")
    width = conv.out_channels
    blocks = tuple(_read_block(blk, f"transformer.resblocks.{i}", width)
                   for i, blk in enumerate(visual.transformer.resblocks))
    ln_pre = None if isinstance(visual.ln_pre, nn.Identity) else _norm(visual.ln_pre, "ln_pre", width)
    tower = _Tower(patch=tuple(conv.kernel_size), tokens=visual.positional_embedding.shape[0], ln_pre=ln_pre,
                   blocks=blocks, ln_post=_norm(visual.ln_post, "ln_post", width), pool_type=visual.pool_type,
                   final_ln_after_pool=bool(visual.final_ln_after_pool), proj=visual.proj is not None)
    floats = {k for k, v in visual.state_dict().items() if v.is_floating_point()}
    unknown = sorted(floats - set(_used_names(tower)))
    if unknown:
        raise _unsupported(f"parameters the composed forward does not know: {unknown[:5]}")
    return tower


def _used_names(tower: _Tower) -> list[str]:
    norms = [tower.ln_post] + ([tower.ln_pre] if tower.ln_pre else [])
    names = ["conv1.weight", "class_embedding", "positional_embedding"] + (["proj"] if tower.proj else [])
    for blk in tower.blocks:
        p = blk.prefix
        norms += [blk.ln_1, blk.ln_2]
        names += [f"{p}.attn.in_proj_weight", f"{p}.attn.out_proj.weight", f"{p}.mlp.c_fc.weight",
                  f"{p}.mlp.c_fc.bias", f"{p}.mlp.c_proj.weight", f"{p}.mlp.c_proj.bias"]
        names += [f"{p}.attn.in_proj_bias"] * blk.in_bias + [f"{p}.attn.out_proj.bias"] * blk.out_bias
        names += [f"{p}.ls_1.gamma"] * blk.ls_1 + [f"{p}.ls_2.gamma"] * blk.ls_2
    return names + [f"{n.prefix}.{s}" for n in norms for s in ("weight", "bias")]


def _check_bank(visual: nn.Module, bank: TaskVectorBank) -> None:
    """Raise naming the first key where the bank's float entries do not match the tower's state dict."""
    tower = {k: tuple(v.shape) for k, v in visual.state_dict().items() if v.is_floating_point()}
    entries = {e.name: tuple(e.shape) for e in bank.entries}
    missing = [k for k in tower if k not in entries]
    if missing:
        raise ValueError(f"the bank has no task vectors for tower key {missing[0]!r} "
                         f"({len(missing)} tower keys missing)")
    extra = [k for k in entries if k not in tower]
    if extra:
        raise ValueError(f"the bank has key {extra[0]!r} that the tower lacks ({len(extra)} such keys)")
    for k, shape in tower.items():
        if entries[k] != shape:
            raise ValueError(f"shape mismatch for {k!r}: bank {list(entries[k])} vs tower {list(shape)}")


def _check_inputs(images: torch.Tensor, coef: object) -> None:
    """Refuse, naming the problem, what the plain tower would refuse or silently misread: images that are
    not a non-empty float ``[N, 3, H, W]`` batch (uint8 pixels must be normalised first, as the plain tower
    requires too), and images or coefficients on the ``meta`` device (they hold no values)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {list(getattr(images, 'shape', []))}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating-point and normalised (image_mean / image_std), got dtype "
                         f"{images.dtype}; convert uint8 pixels first, e.g. with ImageSplit.tensors()")
    if images.shape[0] == 0:
        raise ValueError("images: the batch is empty (N = 0); pass at least one image")
    for name, value in (("images", images), ("coef", coef)):
        if isinstance(value, torch.Tensor) and value.is_meta:
            raise ValueError(f"{name} is on the 'meta' device and holds no values; pass real tensors")


class _Weights:
    """Per-forward access to the weights ``θ0 + Σ coef · τ`` of one batch, in composed or materialised form.

    ``coef`` is ``[M, T, B]`` with ``M = 1`` (one weight set for the whole batch: merged once) or ``M = N``.
    """

    def __init__(self, enc: ComposedEncoder, coef: torch.Tensor, coef_grad: bool, autograd: bool) -> None:
        self.enc, self.mode, self.grad = enc, enc.mode, autograd
        self.dtype = enc.base.dtype
        self.scratch: torch.Tensor | None = None
        # zero coefficients may be skipped unless their derivative (which needs their term) is wanted
        self.skip_zeros = not coef_grad or enc.sparse_grad
        if not self.skip_zeros:
            active = torch.ones(coef.shape[2], coef.shape[1], dtype=torch.bool, device=coef.device)
        else:  # [B, T]: task t is non-zero for some sample in block b
            if coef_grad:  # sparse_grad: 0 is the gradient at every zero coefficient, whatever the path
                coef = torch.where(coef != 0, coef, coef.detach())
            active = (coef != 0).any(dim=0).t()
        self.tasks = active.nonzero()[:, 1]  # task ids of the (block, task) pairs, block-major
        self.task_list = self.tasks.tolist()
        stops = list(itertools.accumulate(active.sum(dim=1).tolist()))
        self.span = list(zip([0, *stops[:-1]], stops, strict=True))
        self.coef = coef.transpose(1, 2)[:, active]  # [M, nnz], same order as the pairs

    def _active(self, name: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Active task ids, their device index, and coefficients ``[M, k]`` of the block holding ``name``."""
        s, e = self.span[self.enc.entries[name][0]]
        return self.task_list[s:e], self.tasks[s:e], self.coef[:, s:e]

    def _segment(self, name: str) -> tuple[int, int]:
        _, offset, shape = self.enc.entries[name]
        return offset, offset + math.prod(shape)

    def _taus(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """``[k, numel]`` task vectors of ``name`` for the task ids ``index`` (compute dtype)."""
        s, e = self._segment(name)
        rows = self.enc.vectors[:, s:e]
        if index.numel() != rows.shape[0]:
            rows = rows.index_select(0, index)
        return rows.to(self.dtype)

    def flat(self, name: str) -> torch.Tensor:
        """``[M', numel]`` weights of ``name`` per sample (``M' = 1`` when no task is active in its block)."""
        s, e = self._segment(name)
        base = self.enc.base[s:e].unsqueeze(0)
        tasks, index, c = self._active(name)
        if not tasks:
            return base
        return torch.addmm(base, c, self._taus(name, index))

    def tensor(self, name: str) -> torch.Tensor:
        """``[M', *shape]`` weights of a small tensor (norm affine, bias, embedding, LayerScale)."""
        return self.flat(name).view(-1, *self.enc.entries[name][2])

    def linear(self, x: torch.Tensor, weight: str, bias: str | None, transposed: bool = True) -> torch.Tensor:
        """``x [N, L, in] → [N, L, out]`` through ``weight`` (``[out, in]``, or ``[in, out]`` when
        ``transposed`` is false, as open_clip stores ``proj``) plus ``bias``."""
        N, L, fin = x.shape
        rows = self.enc.entries[weight][2][0]  # conv1.weight [out, 3, p, p] acts as [out, 3·p·p]
        tasks, index, c = self._active(weight)
        b = self.tensor(bias) if bias is not None else None

        def mat(flat: torch.Tensor) -> torch.Tensor:  # [..., numel] -> [..., in, out]
            m = flat.view(*flat.shape[:-1], rows, -1)
            return m.transpose(-1, -2) if transposed else m

        s, e = self._segment(weight)
        fout = (e - s) // fin
        factored = weight in self.enc.factor_ids and self.mode != "materialise"
        samples = self._samples(c, fin, fout) if tasks and c.shape[0] > 1 and not factored else []
        if tasks and (c.shape[0] == 1 or (not factored and self._materialise(N, L, fin, fout, samples))):
            y = self._materialised(x, mat, weight, index, c)
            return y if b is None else y + b.unsqueeze(1)
        x2, shared_bias = x.reshape(N * L, fin), b is not None and b.shape[0] == 1
        y = torch.addmm(b[0], x2, mat(self.enc.base[s:e])) if shared_bias else x2 @ mat(self.enc.base[s:e])
        y3 = y.view(N, L, -1)
        if tasks and factored:
            self._add_factored(x2, y, weight, index, c, transposed)
        for j, t in enumerate(tasks if not factored else []):  # scale the narrower GEMM side by λ[n, t]
            tau, picked = mat(self.enc.vectors[t, s:e].to(self.dtype)), samples[j]
            if picked is None:  # the whole batch
                scale = c[:, j, None, None]
                if fin <= fout:
                    y.addmm_((x * scale).reshape(N * L, fin), tau)
                else:
                    y3.addcmul_((x2 @ tau).view(N, L, -1), scale)
                continue
            n, scale, xs = picked.numel(), c[picked, j][:, None, None], x.index_select(0, picked)
            if fin <= fout:
                ys = ((xs * scale).reshape(n * L, fin) @ tau).view(n, L, fout)
            else:
                ys = (xs.reshape(n * L, fin) @ tau).view(n, L, fout) * scale
            y3.index_add_(0, picked, ys)
        if b is None or shared_bias:
            return y3
        return y3 + b.unsqueeze(1) if self.grad else y3.add_(b.unsqueeze(1))  # no fresh memory to touch

    def _samples(self, c: torch.Tensor, fin: int, fout: int) -> list[torch.Tensor | None]:
        """Per active task of a layer: the samples its GEMM runs on, gathered (``None``: the whole batch)."""
        if self.mode in ("composed", "materialise") or not self.skip_zeros:
            return [None] * c.shape[1]
        nonzero = c != 0
        counts = nonzero.sum(dim=0).tolist()
        gather = 1.0 + _GATHER_COST * (1.0 / fin + 1.0 / fout)
        keep = [n < c.shape[0] and (self.mode == "sparse" or n * gather < c.shape[0]) for n in counts]
        return [nonzero[:, j].nonzero()[:, 0] if k else None for j, k in enumerate(keep)]

    def _materialise(self, N: int, L: int, fin: int, fout: int, samples: list[torch.Tensor | None]) -> bool:
        if self.mode == "materialise":
            return True
        if self.mode != "auto" or self.grad:
            return False
        gather = 1.0 + _GATHER_COST * (1.0 / fin + 1.0 / fout)
        composed = sum(N if rows is None else rows.numel() * gather for rows in samples) * L
        return composed > N * (_MATERIALISE_COST + 0.25 * L)

    def _add_factored(self, x2: torch.Tensor, y: torch.Tensor, weight: str, index: torch.Tensor,
                      c: torch.Tensor, transposed: bool) -> None:
        """``y += Σ_t c[n, t] · (x B_tᵀ) A_tᵀ`` over the active task vectors' factors, in two GEMMs."""
        a, b = self.enc.factors(weight)  # [T, m, r], [T, r, n]: ΔW_t = a[t] @ b[t] as stored
        if index.numel() != a.shape[0]:
            a, b = a.index_select(0, index), b.index_select(0, index)
        inner, outer = (b, a.transpose(1, 2)) if transposed else (a.transpose(1, 2), b)
        (k, r, _), N = inner.shape, c.shape[0]
        z = x2 @ inner.reshape(k * r, -1).t()  # [N·L, k·r]
        z = (z.view(N, -1, k, r) * c[:, None, :, None]).view(x2.shape[0], k * r)
        y.addmm_(z, outer.reshape(k * r, -1))

    def _materialised(self, x, mat, weight: str, index: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``W0 + Σ c·τ``, a chunk of samples at a time (all at once when ``M = 1``)."""
        s, e = self._segment(weight)
        base, taus = self.enc.base[s:e].unsqueeze(0), self._taus(weight, index)
        if c.shape[0] == 1:
            return x @ mat(self._merge(base, c, taus)[0])
        step = max(1, _CHUNK_ELEMENTS // (e - s))
        return torch.cat([torch.bmm(x[i:i + step], mat(self._merge(base, c[i:i + step], taus)))
                          for i in range(0, x.shape[0], step)])

    def _merge(self, base: torch.Tensor, c: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """``base + c @ taus``; without autograd written into one reused buffer (touching fresh memory for
        every chunk costs as much as the arithmetic)."""
        if self.grad:
            return torch.addmm(base, c, taus)
        numel = c.shape[0] * taus.shape[1]
        if self.scratch is None or self.scratch.numel() < numel:
            self.scratch = base.new_empty(max(numel, _CHUNK_ELEMENTS))
        return torch.addmm(base, c, taus, out=self.scratch[:numel].view(c.shape[0], -1))

    def layer_norm(self, x: torch.Tensor, norm: _Norm) -> torch.Tensor:
        w, b = self.tensor(f"{norm.prefix}.weight"), self.tensor(f"{norm.prefix}.bias")
        dtype = x.dtype
        if norm.fp32:
            x, w, b = x.float(), w.float(), b.float()
        d = x.shape[-1]
        if w.shape[0] == 1 and b.shape[0] == 1:
            y = F.layer_norm(x, (d,), w[0], b[0], norm.eps)
        else:
            ones = (1,) * (x.dim() - 2)
            y = F.layer_norm(x, (d,), None, None, norm.eps)
            w, b = w.view(-1, *ones, d), b.view(-1, *ones, d)
            y = y * w + b if self.grad else y.mul_(w).add_(b)
        return y.to(dtype)


class ComposedEncoder(nn.Module):
    """An open_clip vision tower whose weights are ``θ0 + Σ_t Σ_b coef[n, t, b] · τ_t^(b)`` for image ``n``.

    The tower supplies the architecture only; θ0 and τ come from ``bank`` and are kept as (non-persistent)
    buffers, so the encoder has no parameters and nothing of it reaches an optimizer. ``mode``: ``"auto"``
    (per layer the cheapest by a measured cost model: composed GEMMs over the whole batch or over the samples
    that use each task vector, or, when no gradient is needed, per-sample weights a few samples at a time),
    ``"composed"`` (always the linearity trick over the whole batch), ``"sparse"`` (the linearity trick over
    the samples with a non-zero coefficient) or ``"materialise"`` (always per-sample weights; under autograd
    this keeps one weight copy per sample alive for the backward pass).

    Task vectors that are zero for the whole batch in a block are skipped, and (``"auto"`` where the cost
    model says so, ``"sparse"`` always) a task vector's GEMM runs on only the samples where it is non-zero.
    Under autograd zeros are not skipped by default, because the derivative at a zero coefficient (which a
    straight-through gate needs) depends on them; ``sparse_grad=True`` skips them there too and returns 0 as
    the gradient at every zero coefficient. A low-rank bank's factorised weights always use their factors
    (except in ``"materialise"``). ``dtype`` is the compute dtype (float32 by default).
    """

    def __init__(self, visual: nn.Module, bank: TaskVectorBank, *, mode: str = "auto",
                 sparse_grad: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.tower = _read_tower(visual)
        _check_bank(visual, bank)
        self.mode, self.sparse_grad = mode, sparse_grad
        self.task_names, self.block_names = bank.task_names, bank.block_names
        self.entries = {e.name: (e.block, e.offset, tuple(e.shape)) for e in bank.entries}
        self.register_buffer("base", bank.base.to(dtype), persistent=False)
        self.register_buffer("vectors", bank.vectors, persistent=False)
        self.factor_ids = {name: i for i, name in enumerate(bank.factors)}  # a low-rank bank's factors
        for name, i in self.factor_ids.items():
            a, b = bank.factors[name]
            self.register_buffer(f"factor_a{i}", a.to(dtype), persistent=False)
            self.register_buffer(f"factor_b{i}", b.to(dtype), persistent=False)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [T, m, r], Bt [T, r, n])`` of a factorised entry of a low-rank bank."""
        i = self.factor_ids[name]
        return getattr(self, f"factor_a{i}"), getattr(self, f"factor_b{i}")

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def _coef(self, coef: torch.Tensor, n: int) -> torch.Tensor:
        """Validate ``coef`` ([N, T, B], [T, B] or [T]); return it as ``[M, T, B]`` with M ∈ {1, N}."""
        if not isinstance(coef, torch.Tensor):
            coef = torch.as_tensor(coef)
        T, B = self.num_tasks, self.num_blocks
        shapes = {3: (n, T, B), 2: (T, B), 1: (T,)}
        if shapes.get(coef.dim()) != tuple(coef.shape):
            raise ValueError(f"coef must have shape [N, T, B] = [{n}, {T}, {B}], [T, B] = [{T}, {B}] or "
                             f"[T] = [{T}], got {list(coef.shape)}")
        if not (coef.is_floating_point() or coef.dtype in (torch.int32, torch.int64, torch.bool)):
            raise ValueError(f"coef must be real numbers, got dtype {coef.dtype}")
        coef = coef.to(self.base.device, self.base.dtype)
        bad = ~torch.isfinite(coef)
        if bad.any():
            index = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(f"coef{index} = {coef[tuple(index)].item()} is not finite")
        if coef.dim() == 1:
            coef = coef[:, None].expand(T, B)
        return coef if coef.dim() == 3 else coef.unsqueeze(0)

    def forward(self, images: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """Features ``[N, D]`` (unnormalised): what the tower returns for each image with its own weights."""
        tw = self.tower
        _check_inputs(images, coef)
        N, _, H, W = images.shape
        (ph, pw), gh, gw = tw.patch, H // tw.patch[0], W // tw.patch[1]
        if gh * gw + 1 != tw.tokens:
            raise ValueError(f"images of size {H}x{W} give {gh * gw} patches of {ph}x{pw}; the positional "
                             f"embedding expects {tw.tokens - 1}")
        if isinstance(coef, torch.Tensor) and coef.dim() == 3 and coef.shape[0] == N > 1 \
                and coef.stride(0) == 0:  # expanded from one [T, B] set (aTLAS): merged once, autograd too
            coef = coef[0]
        coef = self._coef(coef, N)
        coef_grad = torch.is_grad_enabled() and coef.requires_grad
        autograd = coef_grad or (torch.is_grad_enabled() and images.requires_grad)
        if coef.shape[0] > 1 and not coef_grad and bool((coef == coef[:1]).all()):
            coef = coef[:1]  # one weight set for the whole batch: merge once
        w = _Weights(self, coef, coef_grad, autograd)

        x = images.to(self.base.device, self.base.dtype)[:, :, :gh * ph, :gw * pw]
        x = x.reshape(N, 3, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(N, gh * gw, 3 * ph * pw)
        x = w.linear(x, "conv1.weight", None)
        cls = w.tensor("class_embedding").expand(N, -1).unsqueeze(1)
        x = torch.cat([cls, x], dim=1) + w.tensor("positional_embedding")
        if tw.ln_pre is not None:
            x = w.layer_norm(x, tw.ln_pre)
        for blk in tw.blocks:
            x = x + self._attention(w, blk, w.layer_norm(x, blk.ln_1))
            p = blk.prefix
            h = w.linear(w.layer_norm(x, blk.ln_2), f"{p}.mlp.c_fc.weight", f"{p}.mlp.c_fc.bias")
            h = w.linear(blk.act(h), f"{p}.mlp.c_proj.weight", f"{p}.mlp.c_proj.bias")
            x = x + (h * w.tensor(f"{p}.ls_2.gamma").unsqueeze(1) if blk.ls_2 else h)
        if tw.final_ln_after_pool:
            pooled = w.layer_norm(self._pool(x), tw.ln_post)
        else:
            pooled = self._pool(w.layer_norm(x[:, :1] if tw.pool_type == "tok" else x, tw.ln_post))
        if not tw.proj:
            return pooled
        return w.linear(pooled.unsqueeze(1), "proj", None, transposed=False).squeeze(1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.tower.pool_type == "tok" else x[:, 1:].mean(dim=1)

    def _attention(self, w: _Weights, blk: _Block, x: torch.Tensor) -> torch.Tensor:
        """Self-attention as ``nn.MultiheadAttention`` computes it (``need_weights=False``; batch_first or
        not only changes its input layout, not the arithmetic)."""
        N, L, d = x.shape
        p, heads = f"{blk.prefix}.attn", blk.heads
        qkv = w.linear(x, f"{p}.in_proj_weight", f"{p}.in_proj_bias" if blk.in_bias else None)
        q, k, v = qkv.view(N, L, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, d)
        a = w.linear(a, f"{p}.out_proj.weight", f"{p}.out_proj.bias" if blk.out_bias else None)
        return a * w.tensor(f"{blk.prefix}.ls_1.gamma").unsqueeze(1) if blk.ls_1 else a
