"""Ahead-of-time compile of the train step for a TPU topology, on any host: memory per chip, FLOPs, collectives, fit.

With libtpu installed (the `tpu` extra), `jax.experimental.topologies` describes the devices of a TPU slice that is
not attached; the train step (train/program.py, the one training runs) is lowered on abstract arguments carrying
shardings on a mesh of those devices and compiled by the real TPU compiler. Nothing is allocated. The compiler's
memory analysis gives per-chip argument, output, temporary and code bytes; a program that does not fit fails with
RESOURCE_EXHAUSTED, and its reason (and the largest buffers it lists) become the report.

`suggest` searches batch size, remat policy and mesh split for the largest setting that fits with headroom.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from jax.experimental import topologies

from flan_jax import models
from flan_jax.train import executable, partitioning, program, validation

GIB = 2 ** 30
SUGGEST_HEADROOM = 0.10

# Per-chip HBM by device kind: (nominal GiB, GiB the TPU compiler lets a program use, as its RESOURCE_EXHAUSTED
# message states for libtpu 0.0.42: "exceeds available HBM (15.75G)"). The compile-only devices do not expose it.
HBM_GIB = {
    "TPU v5 lite": (16.0, 15.75),   # v5e
    "TPU v5": (95.0, 95.74),        # v5p
    "TPU v4": (32.0, 15.25),        # the compiler gives a v4 program one TensorCore's half
    "TPU v6 lite": (32.0, 31.25),   # v6e (Trillium)
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


class TopologyError(ValueError):
    """A topology name the TPU library does not know (or no TPU library): one line naming it."""


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The (compile-only) devices of a TPU topology such as 'v5e:2x2', 'v5p:2x2x2', 'v4:2x2x1'."""
    if not re.fullmatch(r"v[0-9][a-z]*:[0-9]+(x[0-9]+){1,2}", topology or ""):
        raise TopologyError(f"--topology={topology!r}: expected GENERATION:SHAPE, e.g. v5e:2x2, v5p:2x2x2, v4:2x2x1")
    # libtpu takes a host-wide lock for the chips it would drive; compiling drives none, so concurrent compiles (and
    # a compile beside a TPU job) may load it too.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        if "not installed" in first:
            raise TopologyError(f"--topology={topology!r}: no TPU library (pip install 'flan_jax[tpu]')") from e
        raise TopologyError(f"--topology={topology!r}: {first}") from e


def hbm_gib(device) -> tuple[float, float]:
    """(nominal, usable) HBM GiB of one chip of `device`'s kind."""
    if device.device_kind not in HBM_GIB:
        raise TopologyError(f"device kind {device.device_kind!r} has no HBM size in train/compile.py HBM_GIB")
    return HBM_GIB[device.device_kind]


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings (each leaf's shard, not the whole)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jax.dtypes.itemsize_bits(leaf.dtype) // 8   # int4 / NF4: half a byte
    return total


def count_collectives(hlo_text: str) -> dict:
    """{kind: count} of collective instructions in compiled HLO text (async pairs count once)."""
    counts = {}
    for match in _COLLECTIVE_RE.finditer(hlo_text):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return dict(sorted(counts.items()))


def parse_resource_exhausted(message: str) -> tuple[str, Optional[float], list]:
    """(the compiler's reason line, GiB it says the temporaries need, the buffer lines it lists) of an OOM error."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    reason = next((line for line in lines if "RESOURCE_EXHAUSTED" in line), lines[0] if lines else message)
    needed = re.search(r"required for HLO temporaries \(([0-9.]+)([GMK])\)", message)
    scale = {"G": 1.0, "M": 1 / 1024, "K": 1 / 1024 ** 2}
    gib = float(needed.group(1)) * scale[needed.group(2)] if needed else None
    buffers = [line for line in lines if re.match(r"^\d+\.\s", line) or line.startswith(("Size:", "Shape:"))]
    return reason, gib, buffers[:30]


@dataclasses.dataclass
class CompileReport:
    topology: str
    num_slices: int
    num_chips: int
    device_kind: str
    hbm_gib: float            # nominal per chip
    usable_gib: float         # what the compiler lets a program use per chip
    mesh: dict                # {"data": n, "model": m}
    settings: dict            # batch, lengths, remat, fsdp, dtypes, attention kernel: what was compiled
    per_chip_gib: dict        # parameters, optimizer_state, gradients_estimate, batch, arguments, outputs,
                              # temporaries, generated_code (gradients are part of temporaries; total counts each once)
    total_gib: Optional[float]
    fits: bool
    headroom: Optional[float]  # 1 - total / usable
    compile_seconds: float    # wall clock of lower + compile
    compile_cpu_seconds: float  # this process's CPU time in it: comparable across loaded and idle hosts
    compiled_flops: Optional[float]   # all chips, one step (XLA counts a loop body once)
    model_flops: float                # 3 x models.flops_per_example x batch
    collectives: dict
    estimate_gib: float = 0.0         # analytic per-chip estimate (weights, optimizer, gradients, activations)
    traced_flops: Optional[float] = None   # matmul FLOPs of the traced step, scans counted x their length
    error: Optional[str] = None       # the compiler's own reason when it does not fit
    largest_buffers: list = dataclasses.field(default_factory=list)

    @property
    def flops_ratio(self) -> Optional[float]:
        return None if not self.compiled_flops else self.compiled_flops / self.model_flops

    @property
    def traced_ratio(self) -> Optional[float]:
        return None if not self.traced_flops else self.traced_flops / self.model_flops

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "flops_ratio": self.flops_ratio, "traced_ratio": self.traced_ratio}

    def fits_with(self, headroom: float) -> bool:
        return self.fits and self.headroom is not None and self.headroom >= headroom


def model_flops(cfg) -> float:
    """Train-step model FLOPs of the whole batch: 3 x forward (a backward pass costs two forwards)."""
    lengths = cfg.input.task_feature_lengths
    per_example = models.flops_per_example(cfg.model, int(lengths["inputs"]), int(lengths["targets"]))
    return 3.0 * per_example * cfg.input.global_batch_size


def settings_of(cfg, model_cfg) -> dict:
    return {"batch": cfg.input.global_batch_size, "lengths": dict(cfg.input.task_feature_lengths),
            "remat": model_cfg.remat, "fsdp": cfg.mesh.fsdp, "num_partitions": cfg.mesh.num_partitions,
            "mesh_shape": cfg.mesh.mesh_shape, "num_microbatches": cfg.num_microbatches,
            "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
            "attention_kernel": model_cfg.attention_kernel,
            "peft": None if model_cfg.peft is None else model_cfg.peft.method,
            "compile_effort": cfg.compile_effort}


def _attention_shapes(model_cfg, lengths: dict) -> list:
    """[(layers, query length, score elements per head per row)] of each stack: what one layer holds per row."""
    if models.is_encoder_decoder(model_cfg):
        lin, lt = int(lengths["inputs"]), int(lengths["targets"])
        return [(model_cfg.num_encoder_layers, lin, lin * lin), (model_cfg.num_decoder_layers, lt, lt * lt + lt * lin)]
    length = int(lengths["inputs"]) + int(lengths["targets"])
    return [(model_cfg.num_layers, length, length * length)]


def estimate_activation_gib(model_cfg, rows_per_chip: int, lengths: dict, head_chunk: Optional[int] = None,
                            model_shards: int = 1) -> float:
    """A rough per-chip estimate of the activations a step holds: what each layer saves for the backward pass under
    its remat policy, one layer's recomputation at its peak (with remat), and the output head's float32 logits and
    their gradient. Heads, MLP and vocabulary are split over `model_shards` chips (tensor parallelism)."""
    a = np.dtype(model_cfg.dtype).itemsize
    d, f, h = model_cfg.emb_dim, model_cfg.mlp_dim / model_shards, model_cfg.num_heads / model_shards
    saved = peak = 0
    for layers, length, scores in _attention_shapes(model_cfg, lengths):
        per_token = {"none": (8 * d + 3 * f) * a, "dots": (4 * d + 3 * f) * a, "full": d * a}[model_cfg.remat]
        per_layer = length * per_token + (h * scores * (4 + a) if model_cfg.remat == "none" else 0)
        saved += layers * per_layer
        if model_cfg.remat != "none":   # the backward pass recomputes one layer at a time
            peak = max(peak, h * scores * (8 + a) + 3 * length * f * a)
    head_positions = int(lengths["targets"]) if models.is_encoder_decoder(model_cfg) else (head_chunk or sum(
        int(v) for v in lengths.values()))
    logits = head_positions * model_cfg.vocab_size / model_shards * 4 * 2
    return rows_per_chip * (saved + peak + logits) / GIB


def _argument_gib(prog: program.StepProgram) -> dict:
    layout = prog.layout
    params = per_chip_bytes(layout.abstract["params"])
    frozen = 0 if layout.frozen is None else per_chip_bytes(layout.frozen)
    opt_state = per_chip_bytes(layout.abstract["opt_state"])
    return {"parameters": (params + frozen) / GIB, "optimizer_state": opt_state / GIB,
            "gradients_estimate": params / GIB, "batch": per_chip_bytes(prog.batch) / GIB}


def _sub_jaxprs(params: dict) -> list:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                found.append(item)
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                found.append(item.jaxpr)
    return found


def matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general in a jaxpr: a scan's body times its length, a cond's costliest branch,
    a while loop's body once (its trip count is data). Custom-VJP backward rules are not in the jaxpr."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        subs = [matmul_flops(sub) for sub in _sub_jaxprs(eqn.params)]
        if eqn.primitive.name == "cond":
            total += max(subs, default=0.0)
        else:
            total += eqn.params.get("length", 1) * sum(subs) if eqn.primitive.name == "scan" else sum(subs)
    return total


def largest_values(jaxpr, top: int = 8) -> list:
    """The `top` largest values a traced step computes, as 'dtype[shape] GiB (xN)' with global (unsharded) shapes:
    libtpu's RESOURCE_EXHAUSTED message names no buffers, so these say what to shrink."""
    sizes = {}

    def visit(jp):
        for eqn in jp.eqns:
            for var in eqn.outvars:
                aval = getattr(var, "aval", None)
                itemsize = getattr(getattr(aval, "dtype", None), "itemsize", None)   # PRNG keys have none
                if getattr(aval, "shape", None) is not None and itemsize:
                    key = f"{aval.dtype}[{','.join(map(str, aval.shape))}]"
                    sizes[key] = (math.prod(aval.shape) * itemsize, sizes.get(key, (0, 0))[1] + 1)
            for sub in _sub_jaxprs(eqn.params):
                visit(sub)

    visit(jaxpr)
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1][0])[:top]
    return [f"{key} {nbytes / GIB:.3f} GiB (x{count})" for key, (nbytes, count) in ranked]


def _estimate_gib(cfg, model_cfg, report: CompileReport) -> float:
    known = report.per_chip_gib
    rows = cfg.input.global_batch_size // report.mesh[partitioning.DATA]
    head_chunk = None if models.is_encoder_decoder(model_cfg) else cfg.loss.head_chunk
    activations = estimate_activation_gib(model_cfg, rows, cfg.input.task_feature_lengths, head_chunk,
                                          report.mesh[partitioning.MODEL])
    return (known["parameters"] + known["optimizer_state"] + known["gradients_estimate"] + known["batch"]
            + activations)


def compile_train_step(cfg, topology: str, num_slices: int = 1, *, converter=None,
                       save_executable: Optional[str] = None) -> CompileReport:
    """Compiles TrainConfig `cfg`'s train step for `topology` (num_slices slices) and reports per-chip memory, FLOPs,
    collectives and whether it fits. A program the compiler rejects for memory gives a report with fits=False.
    save_executable: a directory to write the compiled step to (train/executable.py), when it fits."""
    devices = topology_devices(topology, num_slices)
    validation.validate_config(cfg, len(devices))
    nominal, usable = hbm_gib(devices[0])
    mesh = partitioning.make_mesh(cfg.mesh, devices=devices)
    prog = program.build(cfg, mesh, converter=converter, platform="tpu")
    model_cfg = models.for_platform(cfg.model, "tpu")
    report = CompileReport(
        topology=topology, num_slices=num_slices, num_chips=len(devices), device_kind=devices[0].device_kind,
        hbm_gib=nominal, usable_gib=usable, mesh=dict(mesh.shape), settings=settings_of(cfg, model_cfg),
        per_chip_gib=_argument_gib(prog), total_gib=None, fits=False, headroom=None, compile_seconds=0.0,
        compile_cpu_seconds=0.0, compiled_flops=None, model_flops=model_flops(cfg), collectives={})
    report.estimate_gib = _estimate_gib(cfg, model_cfg, report)
    traced = jax.make_jaxpr(prog.step_fn)(*prog.abstract_args()).jaxpr
    report.traced_flops = matmul_flops(traced)
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = prog.jitted.lower(*prog.abstract_args())
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, message = None, str(e)
    report.compile_seconds = time.perf_counter() - start
    report.compile_cpu_seconds = time.process_time() - cpu_start
    if compiled is None:
        return _with_failure(report, message, traced)
    report = _with_compiled(report, compiled)
    if save_executable and report.fits:
        executable.save(compiled, lowered, devices, save_executable, cfg.compile_effort, topology=topology,
                        num_slices=num_slices)
    return report


def _with_failure(report: CompileReport, message: str, traced) -> CompileReport:
    reason, temp_gib, buffers = parse_resource_exhausted(message)
    report.error = reason
    report.largest_buffers = buffers or ["(the compiler names none; the largest values of the traced step, global "
                                         "shapes:)"] + largest_values(traced)
    if temp_gib is not None:
        known = report.per_chip_gib
        report.per_chip_gib = {**known, "temporaries": temp_gib}
        report.total_gib = known["parameters"] + known["optimizer_state"] + known["batch"] + temp_gib
        report.headroom = 1.0 - report.total_gib / report.usable_gib
    return report


def _with_compiled(report: CompileReport, compiled) -> CompileReport:
    mem = compiled.memory_analysis()
    gib = lambda n: n / GIB
    report.per_chip_gib = {**report.per_chip_gib, "arguments": gib(mem.argument_size_in_bytes),
                           "outputs": gib(mem.output_size_in_bytes - mem.alias_size_in_bytes),
                           "temporaries": gib(mem.temp_size_in_bytes),
                           "generated_code": gib(mem.generated_code_size_in_bytes)}
    # Donated state buffers are reused for the new state (aliased), so outputs count only what is not aliased.
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    report.total_gib = gib(total)
    report.headroom = 1.0 - report.total_gib / report.usable_gib
    report.fits = report.total_gib <= report.usable_gib
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops") is not None:
        report.compiled_flops = float(cost["flops"]) * report.num_chips   # the SPMD program is one chip's
    report.collectives = count_collectives(compiled.as_text())
    return report


# --- the search -------------------------------------------------------------------------------------------------
_REMAT_ORDER = ("none", "dots", "full")   # least recomputation first


def with_settings(cfg, *, batch: Optional[int] = None, remat: Optional[str] = None, fsdp: Optional[bool] = None,
                  num_partitions: Optional[int] = None, compile_effort: Optional[float] = None):
    """cfg with a different global batch, remat policy, mesh split (mesh_shape cleared when the split changes) or
    compile effort."""
    if compile_effort is not None:
        cfg = dataclasses.replace(cfg, compile_effort=compile_effort)
    if batch is not None:
        cfg = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, global_batch_size=batch))
    if remat is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))
    if fsdp is not None or num_partitions is not None:
        mesh = dataclasses.replace(cfg.mesh, mesh_shape=None,
                                   fsdp=cfg.mesh.fsdp if fsdp is None else fsdp,
                                   num_partitions=cfg.mesh.num_partitions if num_partitions is None else num_partitions)
        cfg = dataclasses.replace(cfg, mesh=mesh)
    return cfg


def candidates(cfg, num_chips: int) -> Iterator[dict]:
    """Settings to try, largest batch first; for each batch the least recomputation, then the mesh splits."""
    remats = _REMAT_ORDER[_REMAT_ORDER.index(cfg.model.remat):]
    splits = [(cfg.mesh.fsdp, cfg.mesh.num_partitions), (not cfg.mesh.fsdp, cfg.mesh.num_partitions)]
    splits += [(False, mp) for mp in (2, 4, 8) if mp <= num_chips and num_chips % mp == 0]
    batch = cfg.input.global_batch_size
    while batch >= 1:
        for remat in remats:
            for fsdp, mp in dict.fromkeys(splits):
                if batch % (num_chips // mp) == 0:
                    yield {"batch": batch, "remat": remat, "fsdp": fsdp, "num_partitions": mp}
        batch //= 2


def suggest(cfg, topology: str, num_slices: int = 1, *, headroom: float = SUGGEST_HEADROOM, max_trials: int = 8,
            grow: bool = True, log: Callable[[str], None] = print) -> tuple[Optional[dict], list]:
    """(the first candidate that fits with `headroom`, [(settings, report) of every trial]). When the configuration
    as given fits, larger batches (x2, x4) are tried first, with its other settings."""
    num_chips = len(topology_devices(topology, num_slices))
    trials = []

    def attempt(settings: dict) -> bool:
        report = compile_train_step(with_settings(cfg, **settings), topology, num_slices)
        trials.append((settings, report))
        log(f"  {settings}: {describe_fit(report)}")
        return report.fits_with(headroom)

    base = {"batch": cfg.input.global_batch_size, "remat": cfg.model.remat, "fsdp": cfg.mesh.fsdp,
            "num_partitions": cfg.mesh.num_partitions}
    tried = set()
    if grow and attempt(base):
        best = base
        for factor in (2, 4):
            bigger = {**base, "batch": base["batch"] * factor}
            if len(trials) >= max_trials or not attempt(bigger):
                break
            best = bigger
        return best, trials
    tried.add(tuple(sorted(base.items())))
    for settings in candidates(cfg, num_chips):
        key = tuple(sorted(settings.items()))
        if key in tried or len(trials) >= max_trials:
            continue
        tried.add(key)
        if attempt(settings):
            return settings, trials
    return None, trials


# --- text ---------------------------------------------------------------------------------------------------------
def describe_fit(report: CompileReport) -> str:
    if report.total_gib is None:
        return f"does not fit: {report.error}"
    verdict = "fits" if report.fits else "does not fit"
    return (f"{verdict}: {report.total_gib:.2f} GiB per chip of {report.usable_gib:.2f} "
            f"(headroom {100 * report.headroom:.0f}%), compile {report.compile_seconds:.0f} s "
            f"({report.compile_cpu_seconds:.0f} s CPU)")


def summary(report: CompileReport) -> str:
    """The report as the lines `flan-jax compile` prints."""
    s = report.settings
    lines = [f"{report.topology} x{report.num_slices}: {report.num_chips} x {report.device_kind} "
             f"({report.hbm_gib:g} GiB HBM, {report.usable_gib:g} usable); mesh {report.mesh}",
             f"batch {s['batch']} ({s['lengths']}), remat {s['remat']}, fsdp {s['fsdp']}, dtype {s['dtype']}, "
             f"param_dtype {s['param_dtype']}, attention {s['attention_kernel']}, peft {s['peft']}, "
             f"compile_effort {s['compile_effort']:g}",
             "per chip (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in report.per_chip_gib.items())
             + f"; analytic estimate {report.estimate_gib:.3f}",
             describe_fit(report)]
    if report.compiled_flops:
        lines.append(f"FLOPs per step (all chips): model {report.model_flops / 1e12:.4g} T; compiled "
                     f"{report.compiled_flops / 1e12:.4g} T (ratio {report.flops_ratio:.3f}; XLA counts a loop body "
                     f"once); traced matmuls {report.traced_flops / 1e12:.4g} T (ratio {report.traced_ratio:.3f})")
    lines.append("collectives: " + (", ".join(f"{k} {v}" for k, v in report.collectives.items()) or "none"))
    lines.append(f"compile {report.compile_seconds:.1f} s wall, {report.compile_cpu_seconds:.1f} s CPU")
    lines += [f"  {b}" for b in report.largest_buffers[:12]]
    return "\n".join(lines)
