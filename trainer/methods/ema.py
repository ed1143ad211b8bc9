"""Teacher weights that follow the student's fp32 master weights, under every ZeRO stage.

A teacher is a frozen copy of some of the student's modules *inside* the module DeepSpeed wraps
(its parameters are named ``PREFIX + student name``), so every ZeRO stage casts, partitions and
gathers it like the student. ``ShadowTeacher`` keeps, per rank, fp32 "shadows" of exactly the
slices of the master weights the rank owns and moves them by ``theta_bar <- m theta_bar +
(1 - m) theta`` after each optimizer step: an EMA (ECLIPSE, PSD's momentum teacher) for m < 1, a
frozen snapshot for m = 1 and a copy of the model for m = 0 (PSD's ``previous`` teacher).

    teacher = ShadowTeacher(engine, "teacher.", momentum=lambda step: 0.995)
    ... engine.step(); teacher.update(step) ...
    state = teacher.state_dict(); teacher.load_state_dict(state)

How each stage holds the slices (and what it costs) is in trainer/methods/eclipse.py's module doc.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError
from ..dist import all_reduce, rank as this_rank


class _Slot:
    """One teacher parameter's EMA: the fp32 shadow of the flat slice ``[start, start + n)`` of
    the parameter that this rank owns, with the student master it follows."""

    def __init__(self, name: str, teacher: torch.nn.Parameter, student: torch.nn.Parameter, world: int,
                 fp32_master: Callable[[], torch.Tensor] | None = None):
        self.name, self.teacher, self.student = name, teacher, student
        self.shape, self.numel = tuple(student.ds_shape if hasattr(student, "ds_id") else student.shape), None
        if hasattr(student, "ds_id"):                                     # ZeRO-3 partition
            from deepspeed.utils import safe_get_local_fp32_param
            self.kind = "zero3"
            self.numel = student.ds_numel
            part = teacher.ds_tensor.numel()
            self.start = this_rank() * part
            self.n = max(0, min(part, self.numel - self.start))
            self._master = lambda: safe_get_local_fp32_param(student).reshape(-1)[: self.n]
            self._local = lambda: teacher.ds_tensor.reshape(-1)[: self.n]
        elif hasattr(student, "_hp_mapping") and student.dtype != torch.float32:
            self.kind = "fragment"                                         # ZeRO-1/2, bf16 optimizer
            self.numel = student.numel()
            mapping = student._hp_mapping
            self.start = mapping.lp_fragment_address.start if mapping is not None else 0
            self.n = mapping.lp_fragment_address.numel if mapping is not None else 0
            self._master = lambda: student._hp_mapping.get_hp_fragment().reshape(-1)
            self._local = None
        else:   # ZeRO-0/1/2 in fp32 (the replicated module weights are the masters) or ZeRO-0 in fp16
            self.kind = "full"
            self.numel, self.start, self.n = student.numel(), 0, student.numel()
            if student.dtype == torch.float32 or not student.requires_grad:   # (a frozen weight never moves)
                self._master = lambda: student.data.reshape(-1)
            elif fp32_master is not None:    # ZeRO-0 fp16: the FP16 optimizer's fp32 copy, not the module's
                self._master = fp32_master
            else:
                raise RuntimeError(f"no fp32 master weight found for {name[name.index('.') + 1:]} "
                                   f"({student.dtype} module weight, no ZeRO partition or fragment)")
            self._local = lambda: teacher.data.reshape(-1)
        local = self._local() if self._local is not None and self.n else None
        # an fp32 teacher is its own shadow (no second copy); a bf16/fp16 one gets an fp32 shadow
        self.aliased = local is not None and local.dtype == torch.float32
        if self.aliased:
            self.shadow = local
            self.shadow.copy_(self.master())
        else:
            self.shadow = self.master().clone() if self.n else torch.zeros(0, device=teacher.device)

    def master(self) -> torch.Tensor:
        return self._master().float() if self.n else torch.zeros(0, device=self.teacher.device)

    def state(self) -> dict:
        return {"shape": self.shape, "start": self.start, "shadow": self.shadow.detach().cpu()}


def fp16_masters(optimizer) -> dict[int, Callable[[], torch.Tensor]]:
    """ZeRO-0 in fp16: ``id(module weight) -> flat fp32 master``, read where DeepSpeed's FP16
    optimizers keep them (they update the masters and copy them, rounded, into the module):
    ``FP16_Optimizer`` (with a fused Adam: one flat fp32 tensor per group, the group's weights in
    order) and ``FP16_UnfusedOptimizer`` (torch's AdamW: one fp32 copy per weight). Each call
    reads the optimizer's current tensors (a checkpoint load copies into them). Empty for any
    other optimizer: ZeRO-1/2/3 link the masters to the weights themselves (``_hp_mapping``,
    ``ds_id``), and in fp32 the module weights are the masters."""
    groups = getattr(optimizer, "fp16_groups", None)
    out: dict[int, Callable[[], torch.Tensor]] = {}
    if groups is None:
        return out
    if hasattr(optimizer, "fp32_groups_flat"):
        for i, group in enumerate(groups):
            offset = 0
            for p in group:
                out[id(p)] = lambda i=i, o=offset, n=p.numel(): optimizer.fp32_groups_flat[i].narrow(0, o, n)
                offset += p.numel()
    elif hasattr(optimizer, "fp32_groups"):
        for i, group in enumerate(groups):
            for j, p in enumerate(group):
                out[id(p)] = lambda i=i, j=j: optimizer.fp32_groups[i][j].reshape(-1)
    return out


class ShadowTeacher:
    """The teacher parameters under ``prefix``, moved towards the student's masters by
    ``momentum(step)`` after each optimizer step (see the module doc)."""

    def __init__(self, engine, prefix: str, momentum: Callable[[int], float]):
        self.prefix, self.momentum = prefix, momentum
        module = engine.module
        world = engine.dp_world_size
        masters = fp16_masters(getattr(engine, "optimizer", None))
        self.slots = []
        for name, q in module.named_parameters():
            if name.startswith(prefix):
                student = module.get_parameter(name[len(prefix):])
                self.slots.append(_Slot(name, q, student, world, masters.get(id(student))))
        kinds = {s.kind for s in self.slots}
        if len(kinds) != 1:
            raise RuntimeError(f"teacher parameters are held in mixed ways {sorted(kinds)}; cannot keep the EMA")
        self.kind = kinds.pop()
        self._write_teacher()

    @torch.no_grad()
    def update(self, step: int) -> None:
        """One EMA step after the optimizer step ``step`` was applied."""
        m = self.momentum(step)
        if m == 1.0:   # a frozen snapshot between refreshes: nothing moves, nothing to exchange
            return
        for s in self.slots:
            if s.n:
                s.shadow.lerp_(s.master(), 1.0 - m)
        self._write_teacher()

    @torch.no_grad()
    def _write_teacher(self) -> None:
        """Refresh the teacher's weights (training dtype) from the fp32 shadows."""
        if self.kind != "fragment":
            for s in self.slots:
                if s.n and not s.aliased:
                    s._local().copy_(s.shadow)
            if self.kind == "zero3":
                self._regather_live()
            return
        # Each rank owns fragments of the masters; one SUM all-reduce assembles the replicated
        # teacher (x + 0 is exact in any dtype).
        dtype = self.slots[0].teacher.dtype
        flat = torch.zeros(sum(s.numel for s in self.slots), dtype=dtype, device=self.slots[0].teacher.device)
        offset = 0
        for s in self.slots:
            if s.n:
                flat[offset + s.start: offset + s.start + s.n] = s.shadow
            offset += s.numel
        flat = all_reduce(flat, "sum")
        offset = 0
        for s in self.slots:
            s.teacher.data.copy_(flat[offset: offset + s.numel].view_as(s.teacher.data))
            offset += s.numel

    def _regather_live(self) -> None:
        """ZeRO-3 keeps small parameters (``stage3_param_persistence_threshold``: LayerNorms,
        biases, embeddings; most of a small model) gathered between forwards and re-gathers them
        from the partitions only at the end of its own optimizer step or in a checkpoint save.
        The EMA writes the partitions after that step, so drop those full copies and gather them
        again (collective: every rank calls this), or the next forward would mix this step's
        partitioned weights with the previous step's persistent ones."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        live = [s.teacher for s in self.slots if s.teacher.ds_status == ZeroParamStatus.AVAILABLE]
        if live:
            live[0].partition(live)     # frees the stale full copies; the partitions hold the EMA
            live[0].all_gather(live)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "slots": {s.name: s.state() for s in self.slots}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for s in self.slots:
            saved = state["slots"][s.name]
            if saved["start"] != s.start or saved["shadow"].numel() != s.shadow.numel():
                raise RuntimeError(f"teacher state for {s.name} was written with another partitioning "
                                   "(world size or ZeRO stage); resume with the same ones")
            s.shadow.copy_(saved["shadow"])
        self._write_teacher()

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Start from a full fp32 teacher (student names, e.g. a grown one): each rank takes the
        slices it owns, so the shadows are exact whatever the training dtype."""
        for s in self.slots:
            name = s.name[len(self.prefix):]
            if name not in full or tuple(full[name].shape) != s.shape:
                raise RuntimeError(f"the inherited teacher has no tensor {name} of shape {s.shape}")
            if s.n:
                s.shadow.copy_(full[name].reshape(-1)[s.start: s.start + s.n].to(s.shadow.device))
        self._write_teacher()

    def memory_bytes(self) -> dict:
        """This rank's teacher memory (weights as held here, fp32 shadows) and a full copy's."""
        held = sum((s.teacher.ds_tensor if s.kind == "zero3" else s.teacher).numel() * s.teacher.element_size()
                   for s in self.slots)
        return {"weights": held, "shadows": sum(s.shadow.numel() * 4 for s in self.slots if not s.aliased),
                "full_copy": sum(s.numel * s.teacher.element_size() for s in self.slots)}


def shadow_state_dict(root: Path, tag: str, pick: Callable[[dict], dict | None], prefix: str,
                      absent: str) -> dict[str, torch.Tensor]:
    """A checkpoint's full fp32 teacher (student names, ``prefix`` removed), assembled from every
    rank's shadow slices in ``trainer_state/``; ``pick(rank_state)`` finds the
    ``ShadowTeacher.state_dict()`` there (None: the checkpoint has none, ``absent`` says why)."""
    where = Path(root) / tag
    files = sorted((where / "trainer_state").glob("rank_*.pt"))
    if not files:
        raise ConfigError(f"checkpoint {where} has no trainer_state/rank_*.pt files")
    states = []
    for f in files:
        state = pick(torch.load(f, map_location="cpu", weights_only=False))
        if state is None:
            raise ConfigError(f"checkpoint {where} has {absent}")
        states.append(state)
    return assemble_shadows(states, prefix, where)


def assemble_shadows(states, prefix: str, where, pick: Callable[[dict], dict] = lambda st: st
                     ) -> dict[str, torch.Tensor]:
    """The full fp32 teacher (student names) from every rank's ``ShadowTeacher.state_dict()``
    (``pick(states[r])``; ``states`` a sequence, indexed in order). A teacher each rank holds
    whole (``kind`` ``full``) is read from the first alone.

        full = assemble_shadows(rank_states, "teacher.", where, pick=lambda st: st["eclipse"])
        teacher.load_full(full)   # each rank of another world size takes its own slices
    """
    parts: dict[str, list] = {}
    for i in range(len(states)):
        state = pick(states[i])
        for name, slot in state["slots"].items():
            parts.setdefault(name, []).append(slot)
        if state.get("kind") == "full":
            break
    out = {}
    for name, slots in parts.items():
        shape = tuple(slots[0]["shape"])
        flat = torch.zeros(math.prod(shape))
        covered = torch.zeros(flat.numel(), dtype=torch.bool)
        for slot in slots:
            n = slot["shadow"].numel()
            flat[slot["start"]: slot["start"] + n] = slot["shadow"]
            covered[slot["start"]: slot["start"] + n] = True
        if not covered.all():
            raise RuntimeError(f"checkpoint {where}: the teacher's {name} is not fully covered by the "
                               "ranks' saved slices (a rank's trainer_state is missing)")
        out[name[len(prefix):]] = flat.reshape(shape)
    return out
