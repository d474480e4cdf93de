"""TaskVectorBank: the task vectors τ_t = θ_t − θ0 of an image encoder in one contiguous ``[T, P]`` buffer.

The buffer is ordered block by block, so block ``b`` is the column segment ``segments[b]`` of ``[T, P]``
and a merge is one matrix-vector product per segment (or one fused Triton kernel on CUDA).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vtvc_pyro.io import atomic_path, sha256_file
from vtvc_pyro.merge import check_coef, merge_flat

StateDict = dict[str, torch.Tensor]
BlockSpec = str | Sequence[str]

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FORMAT = "vtvc_pyro.TaskVectorBank"
_FORMAT_VERSION = 1
_FORMAT_VERSION_LOW_RANK = 2  # factorised entries stored as factors (written only by low-rank banks)
_LAYER_STEM = ("conv1", "class_embedding", "positional_embedding", "patchnorm_pre_ln", "ln_pre")
_LAYER_HEAD = ("ln_post", "proj", "attn_pool", "attn_pool_contrastive")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


class BlockEntry(NamedTuple):
    """One floating-point tensor of the encoder: its place in the flat buffer and its block."""

    name: str
    block: int
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Storage dtype from a ``torch.dtype`` or one of the strings ``float32``, ``bfloat16``, ``float16``."""
    if isinstance(dtype, str):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        return STORAGE_DTYPES[dtype]
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"storage dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def _pattern_matcher(pattern: str) -> Callable[[str], bool]:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"block patterns must be non-empty strings, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise ValueError(f"invalid block regex {pattern!r}: {err}") from err
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


# Sibling order of open_clip's VisionTransformer.state_dict(): own parameters first, then sub-modules in the
# order they are registered; any other name sorts after these, numbers numerically.
_MODEL_ORDER = {name: rank for names in (
    ("class_embedding", "positional_embedding", "proj", "patchnorm_pre_ln", "conv1", "ln_pre", "transformer",
     "attn_pool", "attn_pool_contrastive", "ln_post"),
    ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"),
    ("query", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
     "out_proj", "ln_q", "ln_k"),
    ("c_fc", "c_proj"), ("resblocks",), ("weight", "bias", "gamma"),
) for rank, name in enumerate(names)}


def canonical_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order the pre-trained model itself lists them (open_clip's
    ``visual.state_dict()`` order), whatever order a file stored them in."""
    def key(name: str) -> tuple:
        return tuple((0, int(t), "") if t.isdigit() else (1 + _MODEL_ORDER.get(t, len(_MODEL_ORDER)), 0, t)
                     for t in name.split("."))

    return sorted(names, key=key)


def partition_blocks(names: Sequence[str], blocks: BlockSpec = "tensor") -> tuple[list[str], list[int]]:
    """Assign every float parameter name a block; returns ``(block_names, block id of each name)``.

    ``"tensor"``: one block per tensor. ``"layer"``: ``stem`` (conv1, class/positional embedding, ln_pre),
    one block per residual block (``transformer.resblocks.<i>``), ``head`` (ln_post, proj, attentional
    pooler). A list of name patterns (glob, or regex with a ``re:`` prefix; first match wins): one block
    per pattern, named by the pattern.
    """
    if isinstance(blocks, str) and blocks == "tensor":
        return list(names), list(range(len(names)))
    if isinstance(blocks, str) and blocks == "layer":
        labels: list[str | None] = []
        for name in names:
            top = name.split(".")[0]
            match = _RESBLOCK.match(name)
            if match:
                labels.append(f"transformer.resblocks.{match.group(1)}")
            else:
                labels.append("stem" if top in _LAYER_STEM else "head" if top in _LAYER_HEAD else None)
        unmatched = [n for n, label in zip(names, labels, strict=True) if label is None]
        if unmatched:
            raise ValueError(f"blocks='layer' does not know where these tensors belong: {unmatched}")
        resblocks = sorted({lb for lb in labels if lb.startswith("transformer.")},
                           key=lambda lb: int(lb.rsplit(".", 1)[1]))
        order = [lb for lb in ("stem", *resblocks, "head") if lb in labels]
        index = {lb: i for i, lb in enumerate(order)}
        return order, [index[lb] for lb in labels]
    if isinstance(blocks, str):
        raise ValueError(f"blocks must be 'tensor', 'layer' or a list of name patterns, got {blocks!r}")
    patterns = list(blocks)
    if not patterns:
        raise ValueError("blocks: the list of name patterns is empty")
    if len(set(patterns)) != len(patterns):
        raise ValueError(f"blocks: duplicate name patterns in {patterns}")
    matchers = [_pattern_matcher(p) for p in patterns]
    ids: list[int] = []
    unmatched = []
    for name in names:
        hit = next((i for i, match in enumerate(matchers) if match(name)), None)
        if hit is None:
            unmatched.append(name)
        ids.append(-1 if hit is None else hit)
    if unmatched:
        raise ValueError(f"blocks: no pattern of {patterns} matches these tensors: {unmatched}")
    empty = [p for i, p in enumerate(patterns) if i not in set(ids)]
    if empty:
        raise ValueError(f"blocks: these patterns match no floating-point tensor: {empty}")
    return patterns, ids


def _first(items: list, limit: int = 5) -> str:
    more = f" (first {limit} of {len(items)})" if len(items) > limit else ""
    return f"{items[:limit]}{more}"


def _check_task(task: str, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping,
                floats: set[str]) -> None:
    """Raise a ValueError naming the first keys where ``finetuned`` does not fit ``pretrained``."""
    missing = [k for k in pretrained if k not in finetuned]
    if missing:
        raise ValueError(f"task {task!r}: fine-tuned state dict lacks pre-trained keys {_first(missing)}")
    unexpected = [k for k in finetuned if k not in pretrained]
    if unexpected:
        raise ValueError(f"task {task!r}: fine-tuned state dict has keys the pre-trained one lacks "
                         f"{_first(unexpected)}")
    not_tensor = [k for k, v in finetuned.items() if not isinstance(v, torch.Tensor)]
    if not_tensor:
        raise ValueError(f"task {task!r}: entries are not tensors: {_first(not_tensor)}")
    shapes = [f"{k}: {tuple(finetuned[k].shape)} vs pre-trained {tuple(v.shape)}"
              for k, v in pretrained.items() if finetuned[k].shape != v.shape]
    if shapes:
        raise ValueError(f"task {task!r}: shape mismatch {_first(shapes)}")
    not_float = [k for k in pretrained if k in floats and not finetuned[k].is_floating_point()]
    if not_float:
        raise ValueError(f"task {task!r}: entries are floating-point in the pre-trained state dict but not "
                         f"here: {_first(not_float)}")


class TaskVectorBank:
    """T task vectors of one image encoder in a contiguous ``[T, P]`` buffer, plus θ0 and a block table.

    Only floating-point entries become task vectors; other entries (integer buffers) are carried through
    unchanged. Build it with :meth:`from_state_dicts` or :meth:`from_checkpoints`, or :meth:`load` one.
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        base: torch.Tensor,
        entries: Sequence[BlockEntry],
        block_names: Sequence[str],
        task_names: Sequence[str],
        extras: Mapping[str, torch.Tensor] | None = None,
        state_keys: Sequence[str] | None = None,
        sources: Mapping[str, Mapping[str, str]] | None = None,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        low_rank_spec: Mapping[str, float | int | None] | None = None,
    ) -> None:
        self._entries = list(entries)
        self._index = {e.name: e for e in self._entries}
        self._block_names = list(block_names)
        self._task_names = list(task_names)
        self._extras = dict(extras or {})
        self._state_keys = list(state_keys) if state_keys is not None else [
            *(e.name for e in self._entries), *self._extras]
        self._sources = {k: dict(v) for k, v in (sources or {}).items()}
        P = sum(e.numel for e in self._entries)
        if vectors.dim() != 2 or vectors.shape != (len(self._task_names), P):
            raise ValueError(f"vectors must have shape [T, P] = [{len(self._task_names)}, {P}], "
                             f"got {list(vectors.shape)}")
        if base.shape != (P,):
            raise ValueError(f"base must have shape [P] = [{P}], got {list(base.shape)}")
        if not vectors.is_contiguous():
            raise ValueError("vectors must be one contiguous [T, P] buffer")
        resolve_dtype(vectors.dtype)
        if len(set(self._task_names)) != len(self._task_names):
            raise ValueError(f"task names must be distinct, got {self._task_names}")
        if set(self._state_keys) != set(self._index) | set(self._extras):
            raise ValueError("state_keys must list exactly the float entries and the carried-through entries")
        self._segments = self._block_segments()
        self._vectors = vectors
        self._base = base.to(torch.float32)
        self._factors = _check_factors(factors or {}, self._index, len(self._task_names))
        self._low_rank_spec = dict(low_rank_spec) if self._factors or low_rank_spec else None

    def _block_segments(self) -> list[tuple[int, int]]:
        segments: list[list[int]] = [[-1, -1] for _ in self._block_names]
        offset = 0
        for e in self._entries:
            if e.offset != offset:
                raise ValueError(f"block table: {e.name!r} starts at {e.offset}, expected {offset}")
            if not 0 <= e.block < len(self._block_names):
                raise ValueError(f"block table: {e.name!r} has block id {e.block} outside "
                                 f"0..{len(self._block_names) - 1}")
            seg = segments[e.block]
            if seg[0] < 0:
                seg[0] = offset
            elif seg[1] != offset:
                raise ValueError(f"block table: block {self._block_names[e.block]!r} is not contiguous "
                                 f"(at {e.name!r})")
            offset += e.numel
            seg[1] = offset
        empty = [self._block_names[b] for b, seg in enumerate(segments) if seg[0] < 0]
        if empty:
            raise ValueError(f"block table: blocks without tensors: {empty}")
        return [(s, e) for s, e in segments]

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_state_dicts(
        cls,
        pretrained: Mapping[str, torch.Tensor],
        finetuned: Mapping[str, Mapping[str, torch.Tensor]],
        blocks: BlockSpec = "tensor",
        dtype: torch.dtype | str = torch.float32,
        rank: int | None = None,
        energy: float | None = None,
    ) -> TaskVectorBank:
        """Build from the pre-trained state dict θ0 and ``{task_name: fine-tuned state dict}``; ``rank`` /
        ``energy``: see :meth:`low_rank`."""
        bank = cls._build(pretrained, list(finetuned), finetuned.__getitem__, blocks, dtype)
        return bank.low_rank(rank=rank, energy=energy)

    @classmethod
    def from_checkpoints(
        cls,
        pretrained: str | os.PathLike,
        finetuned: Mapping[str, str | os.PathLike] | Iterable[tuple[str, str | os.PathLike]],
        blocks: BlockSpec = "tensor",
        dtype: torch.dtype | str = torch.float32,
        trust_pickle: bool = False,
        rank: int | None = None,
        energy: float | None = None,
    ) -> TaskVectorBank:
        """Build from checkpoint files (read by :func:`vtvc_pyro.checkpoints.load_state_dict`), one task at
        a time; ``finetuned`` maps task names to files, or lists ``(task, file)`` pairs (a repeated task
        name is refused). The bank records each source file's path and SHA-256. ``rank`` / ``energy``: see
        :meth:`low_rank`.
        """
        from vtvc_pyro.checkpoints import load_state_dict

        finetuned = task_mapping(finetuned)

        def load(task: str) -> StateDict:
            return load_state_dict(finetuned[task], trust_pickle=trust_pickle)

        sources = {"pretrained": {"path": str(pretrained), "sha256": sha256_file(pretrained)}}
        sources.update({t: {"path": str(p), "sha256": sha256_file(p)} for t, p in finetuned.items()})
        theta0 = load_state_dict(pretrained, trust_pickle=trust_pickle)
        bank = cls._build(theta0, list(finetuned), load, blocks, dtype, sources)
        return bank.low_rank(rank=rank, energy=energy)

    @classmethod
    def _build(
        cls,
        pretrained: Mapping[str, torch.Tensor],
        task_names: list[str],
        load_task: Callable[[str], Mapping[str, torch.Tensor]],
        blocks: BlockSpec,
        dtype: torch.dtype | str,
        sources: Mapping[str, Mapping[str, str]] | None = None,
    ) -> TaskVectorBank:
        storage = resolve_dtype(dtype)
        if not task_names:
            raise ValueError("a task-vector bank needs at least one fine-tuned state dict")
        bad_names = [t for t in task_names if not isinstance(t, str) or not t]
        if bad_names:
            raise ValueError(f"task names must be non-empty strings, got {bad_names}")
        not_tensor = [k for k, v in pretrained.items() if not isinstance(v, torch.Tensor)]
        if not_tensor:
            raise ValueError(f"pre-trained state dict: entries are not tensors: {_first(not_tensor)}")
        names = canonical_order(k for k, v in pretrained.items() if v.is_floating_point())
        if not names:
            raise ValueError("pre-trained state dict has no floating-point tensors")
        block_names, block_ids = partition_blocks(names, blocks)
        order = sorted(range(len(names)), key=lambda i: block_ids[i])  # stable: state-dict order in a block
        entries, offset = [], 0
        for i in order:
            shape = tuple(pretrained[names[i]].shape)
            entries.append(BlockEntry(names[i], block_ids[i], offset, shape))
            offset += entries[-1].numel
        base = torch.empty(offset, dtype=torch.float32)
        for e in entries:
            base[e.offset:e.offset + e.numel] = _flat32(pretrained[e.name])
        _check_finite("pre-trained state dict", base, entries)
        vectors = torch.empty(len(task_names), offset, dtype=storage)
        floats = set(names)
        for t, task in enumerate(task_names):
            state = load_task(task)
            _check_task(task, pretrained, state, floats)
            _warn_precision(task, pretrained, state, names, storage)
            for e in entries:
                segment = slice(e.offset, e.offset + e.numel)
                vectors[t, segment] = _flat32(state[e.name]) - base[segment]
            _check_finite(f"task {task!r}", vectors[t], entries)
        extras = {k: v.detach().to("cpu").clone() for k, v in pretrained.items() if k not in floats}
        return cls(vectors, base, entries, block_names, task_names, extras, list(pretrained), sources)

    # ---------------------------------------------------------------- description

    @property
    def task_names(self) -> list[str]:
        return list(self._task_names)

    @property
    def block_names(self) -> list[str]:
        return list(self._block_names)

    @property
    def num_tasks(self) -> int:
        return len(self._task_names)

    @property
    def num_blocks(self) -> int:
        return len(self._block_names)

    @property
    def num_params(self) -> int:
        """P: the number of floating-point parameters (columns of :attr:`vectors`)."""
        return self._base.numel()

    @property
    def param_names(self) -> list[str]:
        """Floating-point entries, in buffer order (block by block)."""
        return [e.name for e in self._entries]

    @property
    def entries(self) -> list[BlockEntry]:
        """The block table: ``(name, block, offset, shape)`` per floating-point entry, in buffer order."""
        return list(self._entries)

    @property
    def segments(self) -> list[tuple[int, int]]:
        """``(start, stop)`` column range of each block in :attr:`vectors`."""
        return list(self._segments)

    @property
    def vectors(self) -> torch.Tensor:
        """All task vectors, ``[T, P]``, storage dtype."""
        return self._vectors

    @property
    def base(self) -> torch.Tensor:
        """θ0 of the floating-point entries, ``[P]``, float32, same layout as :attr:`vectors`."""
        return self._base

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of :attr:`vectors`."""
        return self._vectors.dtype

    @property
    def device(self) -> torch.device:
        return self._vectors.device

    @property
    def sources(self) -> dict[str, dict[str, str]]:
        """``{"pretrained" | task: {"path", "sha256"}}`` when built from checkpoint files, else empty."""
        return {k: dict(v) for k, v in self._sources.items()}

    @property
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Low-rank banks: ``{name: (A [T, m, r], Bt [T, r, n])}`` (float32) for every factorised entry, whose
        task vectors viewed as ``[m, n] = [shape[0], numel / shape[0]]`` are ``A[t] @ Bt[t]``; else empty."""
        return dict(self._factors)

    @property
    def low_rank_spec(self) -> dict[str, float | int | None] | None:
        """``{"rank": r, "energy": e}`` as given to :meth:`low_rank`; ``None`` for an exact bank."""
        return None if self._low_rank_spec is None else dict(self._low_rank_spec)

    def __repr__(self) -> str:
        low = "" if self._low_rank_spec is None else f", low_rank={self._low_rank_spec}"
        return (f"TaskVectorBank(tasks={self._task_names}, blocks={self.num_blocks}, "
                f"params={self.num_params}, dtype={self.dtype}, device={self.device}{low})")

    def _entry(self, name: str) -> BlockEntry:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a floating-point entry of this bank") from None

    def block_index(self, name: str) -> int:
        """Block id of a floating-point entry."""
        return self._entry(name).block

    def pretrained_tensor(self, name: str) -> torch.Tensor:
        """θ0[name] as a float32 view into :attr:`base`."""
        e = self._entry(name)
        return self._base[e.offset:e.offset + e.numel].view(e.shape)

    def task_vector(self, name: str) -> torch.Tensor:
        """τ[:, name] as a ``[T, *shape]`` view into :attr:`vectors` (storage dtype)."""
        e = self._entry(name)
        return self._vectors[:, e.offset:e.offset + e.numel].view(self.num_tasks, *e.shape)

    def state_dict_from_flat(self, flat: torch.Tensor) -> StateDict:
        """A full state dict (original key order) whose float entries are views of ``flat`` ``[P]``; the
        non-float entries are copies of θ0's."""
        if flat.shape != (self.num_params,):
            raise ValueError(f"flat parameters must have shape [{self.num_params}], got {list(flat.shape)}")
        floats = {e.name: flat[e.offset:e.offset + e.numel].view(e.shape) for e in self._entries}
        return {k: floats[k] if k in floats else self._extras[k].clone() for k in self._state_keys}

    def pretrained_state_dict(self) -> StateDict:
        """θ0 as a full state dict (float entries float32, copied)."""
        return self.state_dict_from_flat(self._base.clone())

    # ---------------------------------------------------------------- merging

    def merge(self, coef: torch.Tensor | Sequence[float], backend: str = "auto",
              out: torch.Tensor | None = None) -> StateDict:
        """θ0 + Σ_t coef[t, b(k)] · τ_t[k] as a full state dict (float32) for ``coef`` ``[T]`` or ``[T, B]``.

        ``backend``: ``"auto"``, ``"torch"``, ``"triton"`` or ``"compiled"`` (see
        :func:`vtvc_pyro.merge.merge_flat`). ``out``: a float32 ``[P]`` buffer to merge into (the float
        entries are views of it), e.g. reused across a coefficient grid. The result carries no gradient; use
        :class:`vtvc_pyro.compose.ComposedEncoder` to differentiate in ``coef``.
        """
        coef = check_coef(coef, self.num_tasks, self.num_blocks, device=self.device)
        flat = merge_flat(self._base, self._vectors, coef, self._segments, backend=backend, out=out)
        return self.state_dict_from_flat(flat)

    # ---------------------------------------------------------------- derived banks

    def _replace(self, vectors: torch.Tensor, base: torch.Tensor, task_names: Sequence[str],
                 extras: Mapping[str, torch.Tensor], sources: Mapping[str, Mapping[str, str]],
                 factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> TaskVectorBank:
        return TaskVectorBank(vectors, base, self._entries, self._block_names, task_names, extras,
                              self._state_keys, sources, factors, self._low_rank_spec)

    def to(self, device: torch.device | str) -> TaskVectorBank:
        """The same bank on ``device`` (returns ``self`` if already there)."""
        device = torch.device(device)
        if device == self.device and self._base.device == device:
            return self
        extras = {k: v.to(device) for k, v in self._extras.items()}
        factors = {k: (a.to(device), b.to(device)) for k, (a, b) in self._factors.items()}
        return self._replace(self._vectors.to(device), self._base.to(device), self._task_names, extras,
                             self._sources, factors)

    def select_tasks(self, names: Iterable[str]) -> TaskVectorBank:
        """A sub-bank with the task vectors of ``names``, in that order (knowledge-transfer protocol)."""
        names = list(names)
        unknown = [n for n in names if n not in self._task_names]
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; the bank holds {self._task_names}")
        if not names or len(set(names)) != len(names):
            raise ValueError(f"select_tasks needs distinct task names, got {names}")
        index = torch.tensor([self._task_names.index(n) for n in names], device=self.device)
        sources = {k: v for k, v in self._sources.items() if k == "pretrained" or k in names}
        factors = {k: (a.index_select(0, index), b.index_select(0, index))
                   for k, (a, b) in self._factors.items()}
        return self._replace(self._vectors.index_select(0, index), self._base, names, self._extras, sources,
                             factors)

    def low_rank(self, rank: int | None = None, energy: float | None = None) -> TaskVectorBank:
        """A bank whose task vectors are truncated SVDs (``torch.linalg.svd``) per entry; ``self`` when both
        are ``None``.

        Every entry with two or more dimensions, viewed as ``[m, n] = [shape[0], numel / shape[0]]``, keeps
        per task its ``rank`` leading singular triplets, or the fewest whose squared singular values reach
        the share ``energy`` of the total; the entry's rank is the largest over tasks (smaller ones padded
        with zeros). Entries where ``r · (m + n) ≥ m · n`` and 1-D entries stay dense and exact.
        :attr:`vectors` holds the reconstruction (merges use it); :attr:`factors` the factors, which the
        composed forward uses and :meth:`save` stores instead of the dense columns.
        """
        if rank is None and energy is None:
            return self
        if (rank is None) == (energy is None):
            raise ValueError(f"low_rank takes rank or energy, not both (got rank={rank!r}, "
                             f"energy={energy!r})")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
            raise ValueError(f"energy must be in (0, 1], got {energy!r}")
        vectors, factors = self._vectors.clone(), {}
        for e in self._entries:
            if len(e.shape) < 2:
                continue
            m, n = e.shape[0], e.numel // e.shape[0]
            mats = self.task_vector(e.name).reshape(self.num_tasks, m, n).to(torch.float32)
            u, sv, vh = torch.linalg.svd(mats, full_matrices=False)
            keep = _kept_ranks(sv, rank, energy)  # [T]
            r = max(1, int(keep.max()))
            if r * (m + n) >= m * n:
                continue
            mask = (torch.arange(r, device=sv.device) < keep[:, None]).to(sv.dtype)  # [T, r]
            a = (u[:, :, :r] * (sv[:, :r] * mask)[:, None, :]).contiguous()
            b = vh[:, :r].contiguous()
            factors[e.name] = (a, b)
            recon = torch.bmm(a, b).reshape(self.num_tasks, -1)
            vectors[:, e.offset:e.offset + e.numel] = recon.to(self.dtype)
        return TaskVectorBank(vectors, self._base, self._entries, self._block_names, self._task_names,
                              self._extras, self._state_keys, self._sources, factors,
                              {"rank": rank, "energy": None if energy is None else float(energy)})

    # ---------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank as one safetensors file (atomically), with its task names, block table and
        source checksums in the metadata."""
        meta = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "task_names": self._task_names,
            "block_names": self._block_names,
            "entries": [[e.name, e.block, e.offset, list(e.shape)] for e in self._entries],
            "state_keys": self._state_keys,
            "sources": self._sources,
        }
        tensors = {"vectors": self._vectors.cpu(), "base": self._base.cpu()}
        tensors.update({f"extra/{k}": v.cpu().contiguous() for k, v in self._extras.items()})
        if self._factors:  # factorised columns are stored as their factors only
            meta.update(version=_FORMAT_VERSION_LOW_RANK, low_rank=self._low_rank_spec,
                        factorised=list(self._factors))
            tensors["vectors"] = torch.cat([self.task_vector(e.name).reshape(self.num_tasks, -1).cpu()
                                            for e in self._entries if e.name not in self._factors], dim=1)
            for k, (a, b) in self._factors.items():
                tensors[f"factor_a/{k}"], tensors[f"factor_b/{k}"] = a.cpu(), b.cpu()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={_FORMAT: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True,
             device: torch.device | str = "cpu") -> TaskVectorBank:
        """Read a bank written by :meth:`save`; ``mmap=True`` maps the file rather than reading it in."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task-vector bank {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu", backend="mmap" if mmap else "pread") as f:
                raw = (f.metadata() or {}).get(_FORMAT)
                if raw is None:
                    raise ValueError(f"{str(path)!r} is a safetensors file but not a TaskVectorBank "
                                     f"(no {_FORMAT!r} metadata)")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
            raise ValueError(f"cannot read task-vector bank {str(path)!r} (truncated or corrupt?): "
                             f"{err}") from err
        meta = json.loads(raw)
        if meta.get("version") not in (_FORMAT_VERSION, _FORMAT_VERSION_LOW_RANK):
            raise ValueError(f"{str(path)!r}: unsupported bank format version {meta.get('version')!r}")
        entries = [BlockEntry(n, int(b), int(o), tuple(s)) for n, b, o, s in meta["entries"]]
        extras = {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}
        try:
            factors = {k: (tensors[f"factor_a/{k}"], tensors[f"factor_b/{k}"])
                       for k in meta.get("factorised", [])}
            vectors = _expand_factors(tensors["vectors"], entries, factors) if factors else tensors["vectors"]
            bank = cls(vectors, tensors["base"], entries, meta["block_names"], meta["task_names"],
                       extras, meta["state_keys"], meta["sources"], factors, meta.get("low_rank"))
        except (KeyError, ValueError, RuntimeError) as err:
            raise ValueError(f"{str(path)!r}: inconsistent task-vector bank: {err}") from err
        _check_bank_finite(bank, str(path))
        return bank.to(device)


def task_mapping(finetuned: Mapping[str, str | os.PathLike] | Iterable[tuple[str, str | os.PathLike]]
                 ) -> dict[str, str | os.PathLike]:
    """``{task: file}`` from a mapping or from ``(task, file)`` pairs, refusing a task named twice."""
    if isinstance(finetuned, Mapping):
        return dict(finetuned)
    mapping: dict[str, str | os.PathLike] = {}
    for task, path in finetuned:
        if task in mapping:
            raise ValueError(f"task {task!r} is given twice ({os.fspath(mapping[task])} and "
                             f"{os.fspath(path)}); give every task once")
        mapping[task] = path
    return mapping


def _warn_precision(task: str, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                    names: Sequence[str], storage: torch.dtype) -> None:
    """Warn when a task's floating-point tensors are stored in another precision than θ0's: its task
    vector then carries that precision's rounding error, whatever the bank's storage dtype."""
    mixed = sorted({(str(finetuned[k].dtype), str(pretrained[k].dtype)) for k in names
                    if finetuned[k].dtype != pretrained[k].dtype})
    if mixed:
        detail = ", ".join(f"{ft} where the pre-trained weights are {pre}" for ft, pre in mixed)
        warnings.warn(f"task {task!r}: fine-tuned weights are {detail}; τ = θ_t − θ0 is computed in float32 "
                      f"and stored as {storage}, but is only as precise as the coarser of the two",
                      UserWarning, stacklevel=4)


def _check_bank_finite(bank: TaskVectorBank, source: str) -> None:
    """Raise naming the task and tensor of the first non-finite value of a loaded bank."""
    entries = bank.entries
    _check_finite(f"{source}: pre-trained weights", bank.base, entries)
    for t, task in enumerate(bank.task_names):
        _check_finite(f"{source}: task {task!r}", bank.vectors[t], entries)


def _flat32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).to("cpu", torch.float32)


def _check_finite(what: str, flat: torch.Tensor, entries: Sequence[BlockEntry]) -> None:
    if torch.isfinite(flat).all():
        return
    for e in entries:
        segment = flat[e.offset:e.offset + e.numel]
        if not torch.isfinite(segment).all():
            bad = segment[~torch.isfinite(segment)][0].item()
            raise ValueError(f"{what}: {e.name!r} holds a non-finite value ({bad})")


def _kept_ranks(sv: torch.Tensor, rank: int | None, energy: float | None) -> torch.Tensor:
    """``[T]`` ranks kept per task from singular values ``sv [T, k]``: ``rank``, or the fewest leading ones
    whose squared values reach the share ``energy`` of the total (0 for an all-zero matrix)."""
    if rank is not None:
        return torch.full((sv.shape[0],), min(rank, sv.shape[1]), dtype=torch.int64)
    power = sv.double().square()
    share = power.cumsum(dim=1) / power.sum(dim=1, keepdim=True).clamp(min=1e-300)
    reached = share >= energy * (1 - 1e-12)  # rounding: energy=1 keeps the full rank, not one more
    return torch.where(power.sum(dim=1) > 0, reached.double().argmax(dim=1) + 1, 0).cpu()


def _check_factors(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], index: Mapping[str, BlockEntry],
                   num_tasks: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Raise naming the entry whose factors do not have the shapes ``[T, m, r]`` and ``[T, r, n]``."""
    for name, (a, b) in factors.items():
        if name not in index:
            raise ValueError(f"factors for {name!r}, which is not a floating-point entry of the bank")
        shape = index[name].shape
        m, n = shape[0], index[name].numel // max(shape[0], 1)
        if len(shape) < 2 or a.dim() != 3 or b.dim() != 3 or a.shape[:2] != (num_tasks, m) \
                or b.shape != (num_tasks, a.shape[2], n):
            raise ValueError(f"factors of {name!r} (shape {list(shape)}) must be [T, m, r] = "
                             f"[{num_tasks}, {m}, r] and [T, r, n] = [{num_tasks}, r, {n}], got "
                             f"{list(a.shape)} and {list(b.shape)}")
    return dict(factors)


def _expand_factors(dense: torch.Tensor, entries: Sequence[BlockEntry],
                    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The full ``[T, P]`` buffer from the dense columns of the unfactorised entries and the factors."""
    T, P = dense.shape[0], sum(e.numel for e in entries)
    vectors, col = torch.empty(T, P, dtype=dense.dtype), 0
    for e in entries:
        segment = slice(e.offset, e.offset + e.numel)
        if e.name in factors:
            a, b = factors[e.name]
            vectors[:, segment] = torch.bmm(a.float(), b.float()).reshape(T, -1).to(dense.dtype)
        else:
            vectors[:, segment] = dense[:, col:col + e.numel]
            col += e.numel
    if col != dense.shape[1]:
        raise ValueError(f"vectors holds {dense.shape[1]} dense columns, the unfactorised entries {col}")
    return vectors
