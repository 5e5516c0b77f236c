"""MetaSchedule tuning of a library's kernels, kept in a database that later builds reuse.

    report = tune_functions({"decode": graph}, "cpu", "smollm2.tune", trials_per_task=64)
    exe = build_functions(graphs, "cpu", tuning_db="smollm2.tune")   # tuned kernels where they are faster

What is tuned: the PrimFuncs a build of the same graphs for the same target schedules (lowering plus the
fusion stage of the build pipeline: pipeline.fused_module), so the database's keys -- structural hashes of
those PrimFuncs -- are what MetaScheduleApplyDatabase looks up in a later build. Left out: kernels with a symbolic shape (MetaSchedule measures concrete arguments, so a
prefill with a symbolic length keeps its default schedule), hand-written ones (``tirx.is_scheduled``) and,
unless ``ops="all"``, kernels without a reduction: copies and elementwise kernels are memory-bound under
any schedule, the GEMMs, norms and softmaxes are where the time goes.

Never slower than no tuning, within a margin the measurements can resolve: each kernel's default schedule
(our CPU rules, DLight on GPUs) is measured and given to the search as a record. After the search the
default and the best few candidates are measured again, in turns, and a candidate is kept only if it beats
the default by MARGIN; the database then holds that one record per kernel (records of kernels this run did
not tune are carried over), which is what a build applies.

On targets with ``measure_in_process`` (the CPU) candidates are built and timed in this process: MetaSchedule's popen workers import TVM afresh
for every batch of candidates (~2 s each on a 2-core machine, more than the builds themselves). The price:
a candidate that crashed would end the process (none did: candidates are valid schedule transformations).
On GPUs MetaSchedule's own popen builder and runner are used, so a faulting kernel kills a worker, not the
CUDA context of the tuning process, and its C++ timing loop (20 runs a measurement: CUDA graphs hide
launches in a decode step too). Weights of up to 32 MB can stay in an H100's 50 MB L2 between those runs,
which favours cache-friendly candidates: check the end-to-end figure, not only the report.

TVM's compiler (MetaSchedule, s_tir) is imported inside the functions that use it: build.py imports this
module for TuningDatabase where an exported library runs with TVM's runtime alone.
"""
from __future__ import annotations

import inspect
import json
import linecache
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tvm
import tvm_ffi
from tvm.ir.utils import derived_object

from .pipeline import fused_module
from .targets import Target, resolve_target

MANIFEST = "llmasos-tuning.json"
FORMAT, VERSION = "llmasos-tuning", 1
OPS = ("reduce", "all")
MARGIN = 0.03      # a candidate must beat the default schedule by this fraction to replace it
RECHECK, ROUNDS = 3, 3   # candidates measured again after the search, and turns of that measurement


class TuningError(RuntimeError):
    """A tuning database that does not exist, is damaged or was tuned for another target."""


def _target_key(target: dict) -> dict:
    """What must agree between the tuned and the building target: kind, CPU model / GPU arch, triple
    (not the core count: a schedule tuned on 2 cores is still a valid schedule on 16)."""
    return {k: target[k] for k in ("kind", "mcpu", "mtriple", "arch") if k in target}


class TuningDatabase:
    """A directory holding MetaSchedule's JSON database and our manifest (target, versions, last report).

    ``applied`` lists the kernels the last build that used it took from it."""

    def __init__(self, path: Path, spec: Target, database):
        self.path = path
        self.spec = spec
        self.database = database
        self.applied: list = []

    @classmethod
    def open(cls, path_or_db, spec: Target) -> "TuningDatabase":
        """The database in ``path_or_db`` (a directory from ``tune``), checked against ``spec``'s target."""
        if isinstance(path_or_db, TuningDatabase):
            cls._check_target(path_or_db.path, path_or_db.spec.target, spec)
            return path_or_db
        path = Path(path_or_db)
        manifest = cls.read_manifest(path)
        cls._check_target(path, manifest["target"], spec)
        return cls(path, spec, cls._json_database(path, allow_missing=False))

    @classmethod
    def create(cls, path, spec: Target) -> "TuningDatabase":
        """Open ``path`` for tuning: created if missing; an existing database must be for ``spec``'s target
        (its records are kept, new ones added)."""
        path = Path(path)
        if path.exists() and (path / MANIFEST).exists():
            manifest = cls.read_manifest(path)
            cls._check_target(path, manifest["target"], spec)
        else:
            path.mkdir(parents=True, exist_ok=True)
            cls._write_manifest(path, spec, None)
        return cls(path, spec, cls._json_database(path, allow_missing=True))

    def rewrite(self, chosen: list, target) -> None:
        """Replace the database's records by one per kernel: ``chosen`` [(mod, trace, run_secs, args_info)]
        for the kernels just tuned, the best earlier record for every other kernel."""
        from tvm.s_tir import meta_schedule as ms  # deferred: the TVM compiler (module docstring)
        new_keys = {tvm_ffi.structural_hash(mod) for mod, *_ in chosen}
        keep = {}
        for r in self.database.get_all_tuning_records():
            key = tvm_ffi.structural_hash(r.workload.mod)
            secs = [float(x) for x in r.run_secs or []]
            if key in new_keys or not secs:
                continue
            if key not in keep or sum(secs) / len(secs) < keep[key][0]:
                keep[key] = (sum(secs) / len(secs), r)
        tmp = self.path / ".rewrite"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fresh = self._json_database(tmp, allow_missing=True)
        for _, r in keep.values():
            fresh.commit_tuning_record(ms.database.TuningRecord(r.trace, fresh.commit_workload(r.workload.mod),
                                                                r.run_secs, r.target, r.args_info))
        for mod, trace, secs, args in chosen:
            fresh.commit_tuning_record(ms.database.TuningRecord(trace, fresh.commit_workload(mod), secs, target,
                                                                args))
        del fresh
        for name in ("database_workload.json", "database_tuning_record.json"):
            os.replace(tmp / name, self.path / name)
        shutil.rmtree(tmp, ignore_errors=True)
        self.database = self._json_database(self.path, allow_missing=False)

    @staticmethod
    def read_manifest(path: Path) -> dict:
        f = path / MANIFEST
        if not f.is_file():
            raise TuningError(f"{path} is not a tuning database: {MANIFEST} is missing "
                              f"(make one with `llmasos tune` or llmasos.tune)")
        try:
            m = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise TuningError(f"{f}: unreadable manifest: {e}") from None
        if m.get("format") != FORMAT or m.get("version") != VERSION or not isinstance(m.get("target"), dict):
            raise TuningError(f"{f}: not a version-{VERSION} {FORMAT} manifest")
        return m

    @staticmethod
    def _write_manifest(path: Path, spec: Target, report: Optional["TuningReport"]) -> None:
        m = {"format": FORMAT, "version": VERSION, "target": spec.target, "tvm": tvm.__version__}
        if report is not None:
            m["report"] = report.to_dict()
        (path / MANIFEST).write_text(json.dumps(m, indent=1))

    @staticmethod
    def _check_target(path: Path, tuned: dict, spec: Target) -> None:
        if _target_key(tuned) != _target_key(spec.target):
            raise TuningError(f"tuning database {path} was tuned for {_target_key(tuned)}; this build targets "
                              f"{_target_key(spec.target)} ('{spec.name}'). Tune again for this target or "
                              f"build without the database")

    @staticmethod
    def _json_database(path: Path, allow_missing: bool):
        from tvm.s_tir import meta_schedule as ms  # deferred: the TVM compiler (module docstring)
        wl, rec = path / "database_workload.json", path / "database_tuning_record.json"
        if not allow_missing and not (wl.is_file() and rec.is_file()):
            raise TuningError(f"tuning database {path}: {wl.name} or {rec.name} is missing")
        try:
            return ms.database.JSONDatabase(str(wl), str(rec), allow_missing=allow_missing)
        except Exception as e:  # noqa: BLE001 -- TVM raises its own error types for a damaged file
            raise TuningError(f"tuning database {path}: cannot read it: {type(e).__name__}: {e}") from None


@dataclass
class TaskResult:
    name: str
    weight: int                  # calls per run of the library's functions
    default_us: Optional[float]  # the default schedule's time (None: it could not be built or run)
    best_us: float               # the database's best: what a build with the database runs
    chosen: str                  # "tuned" or "default"
    trials: int = 0              # candidates the search measured for this kernel

    @property
    def speedup(self) -> Optional[float]:
        return self.default_us / self.best_us if self.default_us and self.best_us else None


@dataclass
class TuningReport:
    target: dict
    database: str
    tasks: list = field(default_factory=list)          # [TaskResult]
    skipped: dict = field(default_factory=dict)        # reason -> number of kernels
    failed: dict = field(default_factory=dict)         # kernel -> why MetaSchedule's search failed on it
    trials: int = 0
    seconds: float = 0.0

    @property
    def default_us(self) -> float:
        """Sum over tasks of weight x default time: the tuned kernels' share of a run before tuning."""
        return sum(t.weight * (t.default_us or t.best_us) for t in self.tasks)

    @property
    def best_us(self) -> float:
        return sum(t.weight * t.best_us for t in self.tasks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel_us_default"], d["kernel_us_tuned"] = round(self.default_us, 2), round(self.best_us, 2)
        d["kernel_speedup"] = round(self.default_us / self.best_us, 3) if self.best_us else None
        return d

    def summary(self) -> str:
        lines = [f"{len(self.tasks)} kernels measured, {sum(t.chosen == 'tuned' for t in self.tasks)} with a "
                 f"searched schedule ({self.trials} trials, {self.seconds:.0f} s); "
                 f"skipped: {', '.join(f'{n} {r}' for r, n in self.skipped.items()) or 'none'}"]
        lines += [f"  search failed on {k} (default schedule kept): {v}" for k, v in self.failed.items()]
        for t in sorted(self.tasks, key=lambda t: -t.weight * (t.default_us or t.best_us)):
            base = f"{t.default_us:9.1f}" if t.default_us is not None else "   failed"
            lines.append(f"  {t.name:48s} x{t.weight:<3d} default {base} us  best {t.best_us:9.1f} us  "
                         f"({t.chosen}, {t.trials} trials)")
        lines.append(f"  weighted kernel time: {self.default_us:.1f} us -> {self.best_us:.1f} us")
        return "\n".join(lines)


# -- measuring ----------------------------------------------------------------------------------------
# On the CPU a kernel is timed in a loop over copies of its arguments (up to ROTATE_BYTES, at most MAX_SETS
# copies: past the last-level cache for any kernel with weights of 4 MB or more), called back to back: in
# a decode step the weights stream from DRAM and TVM's worker threads are awake.
# (Timing one warm call hides the first; flushing the caches before each timed call, MetaSchedule's
# option, also puts the thread pool to sleep, and then a parallel schedule pays ~100 us of wake-up that a
# real step does not, so single-threaded candidates won.) The Python call adds the same few microseconds
# to every candidate of a kernel, which leaves their order alone.
ROTATE_BYTES = 256 << 20
MAX_SETS, REPEAT, MIN_SECONDS = 64, 5, 0.02


def _cpu_timer():
    # deferred: the TVM compiler (module docstring)
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument
    cache = {}

    def time_kernel(rt, dev, infos) -> list:
        key = json.dumps(infos, default=str)
        if key not in cache:
            cache.clear()  # one kernel's argument sets at a time (a search measures one task after another)
            per_set = sum(math.prod(i[2]) * _itemsize(i[1]) for i in infos if i[0] == "TENSOR") or 1
            cache[key] = default_alloc_argument(dev, infos, max(1, min(MAX_SETS, -(-ROTATE_BYTES // per_set))))
        sets = cache[key]
        f = rt[rt.entry_name]
        for a in sets:  # warm-up: page faults, instruction cache, the thread pool
            f(*a)
        t0 = time.perf_counter()
        f(*sets[0])
        n = max(len(sets), math.ceil(MIN_SECONDS / max(time.perf_counter() - t0, 1e-7)))
        out = []
        for _ in range(REPEAT):
            t0 = time.perf_counter()
            for i in range(n):
                f(*sets[i % len(sets)])
            dev.sync()
            out.append((time.perf_counter() - t0) / n)
        return out
    return time_kernel


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _import_tensor_intrinsics() -> None:
    """``import tvm.s_tir.tensor_intrin`` (MetaSchedule's TuneContext and builder do it), made fast.

    It parses hundreds of TVMScript intrinsics, and the parser calls ``inspect.stack()`` for each, which
    resolves every frame's module by scanning sys.modules: over a minute in a process that has imported
    torch. The parser reads only each frame and its source line, so a stack built from the frames and
    linecache serves it."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def fast_stack(context=1):
        out, f = [], sys._getframe(1)
        while f is not None:
            line = linecache.getline(f.f_code.co_filename, f.f_lineno)
            out.append(inspect.FrameInfo(f, f.f_code.co_filename, f.f_lineno, f.f_code.co_name,
                                         [line] if line else None, 0))
            f = f.f_back
        return out

    real, inspect.stack = inspect.stack, fast_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401 -- deferred: the slow import this function exists for
    finally:
        inspect.stack = real


def _in_process_builder(spec: Target):
    # deferred: the TVM compiler (module docstring)
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    config = spec.pass_config()  # candidates compile as a build's kernels do (loop partitioning on the CPU)

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            out = []
            for bi in build_inputs:
                try:
                    with tvm.transform.PassContext(opt_level=3, config=config):
                        out.append(BuilderResult(default_export(default_build(bi.mod, bi.target, None)), None))
                except Exception as e:  # noqa: BLE001 -- a candidate that does not compile is a failed trial
                    out.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
            return out
    return InProcessBuilder()


def _in_process_runner(spec: Target):
    from tvm.s_tir.meta_schedule.runner import PyRunner  # deferred: the TVM compiler (module docstring)
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    time_kernel = _cpu_timer()

    @derived_object
    class InProcessRunner(PyRunner):
        def run(self, runner_inputs):
            out = []
            for ri in runner_inputs:
                try:
                    dev = tvm.device(str(ri.device_type), 0)
                    rt = tvm.runtime.load_module(str(ri.artifact_path))
                    infos = [a.as_json() for a in ri.args_info]
                    out.append(LocalRunnerFuture(res=time_kernel(rt, dev, infos)))
                except Exception as e:  # noqa: BLE001 -- a candidate that fails to run is a failed trial
                    out.append(LocalRunnerFuture(error_message=f"{type(e).__name__}: {e}"))
            return out
    return InProcessRunner()


def _builder_runner(spec: Target):
    from tvm.s_tir import meta_schedule as ms  # deferred: the TVM compiler (module docstring)
    if spec.measure_in_process:
        return _in_process_builder(spec), _in_process_runner(spec)
    config = ms.runner.EvaluatorConfig(number=20, repeat=3, min_repeat_ms=0, enable_cpu_cache_flush=False)
    return ms.builder.LocalBuilder(), ms.runner.LocalRunner(evaluator_config=config)


def _measure(sch_mod, args_info, spec: Target, builder, runner) -> Optional[list]:
    from tvm.s_tir import meta_schedule as ms  # deferred: the TVM compiler (module docstring)
    built = builder.build([ms.builder.BuilderInput(sch_mod, spec.tvm_target())])[0]
    if built.error_msg:
        return None
    try:
        res = runner.run([ms.runner.RunnerInput(built.artifact_path, spec.device, args_info)])[0].result()
    finally:  # (during a search MetaSchedule's RemoveBuildArtifact callback does this)
        shutil.rmtree(os.path.dirname(str(built.artifact_path)), ignore_errors=True)
    return None if res.error_msg else [float(x) for x in res.run_secs]


# -- tasks ---------------------------------------------------------------------------------------------
def _has_reduction(func) -> bool:
    from tvm import s_tir  # deferred: the TVM compiler (module docstring)
    from tvm.s_tir.dlight.analysis import get_root_block

    from .cpu_schedule import is_reduction_block
    sch = s_tir.Schedule(func)
    return any(is_reduction_block(sch, b) for b in sch.get_child_blocks(get_root_block(sch)))


def _static_args(func):
    from tvm.s_tir import meta_schedule as ms  # deferred: the TVM compiler (module docstring)
    try:
        return ms.arg_info.ArgInfo.from_prim_func(func)
    except (TypeError, ValueError):  # a symbolic dim or a scalar argument: nothing concrete to measure
        return None


def extract_tasks(graphs: dict, spec: Target, ops: str = "reduce") -> tuple:
    """([(ExtractedTask, args_info)], {reason: count}) for the kernels tune() would search."""
    from tvm.s_tir import meta_schedule as ms  # deferred: the TVM compiler (module docstring)
    if ops not in OPS:
        raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
    tasks, skipped = [], {}
    for t in ms.relax_integration.extract_tasks(fused_module(graphs, spec), spec.tvm_target()):
        func = t.dispatched[0]["main"]
        args = _static_args(func)
        reason = ("hand-scheduled" if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)
                  else "symbolic shape" if args is None
                  else "no reduction" if ops == "reduce" and not _has_reduction(func) else None)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            tasks.append((t, args))
    return tasks, skipped


def _default_schedule(func, spec: Target):
    target = spec.tvm_target()
    with target:
        for rule in spec.schedule_rules():
            try:
                sch = rule.apply(func, target, False)
            except Exception:  # noqa: BLE001 -- DLight's own driver treats a failing rule as not applying
                sch = None
            if sch is not None:
                return sch[0] if isinstance(sch, list) else sch
    return None


def tune_functions(graphs: dict, target: Any, db, *, trials_per_task: int = 64, ops: str = "reduce", seed: int = 0,
                   log=None) -> TuningReport:
    """Search schedules for the kernels of a library built from ``graphs`` (the dict build_functions
    takes) for ``target`` and keep them in the tuning database directory ``db``.

    trials_per_task: search budget per kernel (0: only measure the default schedules). ops: "reduce"
    (kernels with a reduction) or "all". log: a callable for progress lines (default: silent). An existing
    database for the same target is extended: its record for a kernel tuned again competes with the new
    candidates, its other records are kept. MetaSchedule's own log goes to ``db/logs/tuning.log``.
    """
    from tvm.s_tir import meta_schedule as ms  # deferred: the TVM compiler (module docstring)

    say = log or (lambda *_: None)
    spec = resolve_target(target)
    if spec.schedule == "none":
        raise ValueError(f"target '{spec.name}' has no schedules to tune (schedule='none')")
    if not isinstance(trials_per_task, int) or trials_per_task < 0:
        raise ValueError(f"trials_per_task must be an int >= 0, got {trials_per_task!r}")
    if not spec.tvm_device().exist:
        raise TuningError(f"tuning for target '{spec.name}' measures kernels on a {spec.device} device, and this "
                          f"machine has none")
    t_start = time.perf_counter()
    _import_tensor_intrinsics()
    tdb = TuningDatabase.create(db, spec)
    tasks, skipped = extract_tasks(graphs, spec, ops)
    report = TuningReport(target=spec.target, database=str(tdb.path), skipped=skipped)
    say(f"{len(tasks)} kernels to tune; skipped: {skipped}")
    if not tasks:
        warnings.warn(f"nothing to tune: no kernel of static shape ({skipped}); a symbolic batch or length "
                      f"keeps every kernel out (compile with a fixed batch, e.g. batch=1)", stacklevel=2)
        TuningDatabase._write_manifest(tdb.path, spec, report)
        return report
    builder, runner = _builder_runner(spec)
    target_t = spec.tvm_target()
    search = ms.database.MemoryDatabase()
    defaults, base_records, searched, failed = {}, {}, {}, {}
    for t, args in tasks:
        mod = t.dispatched[0]
        sch = _default_schedule(mod["main"], spec)
        secs = _measure(sch.mod, args, spec, builder, runner) if sch is not None else None
        if secs is not None:  # the search's first record: its population may start from it
            search.commit_tuning_record(ms.database.TuningRecord(sch.trace, search.commit_workload(mod), secs,
                                                                 target_t, args))
        base_records[t.task_name] = int(secs is not None)
        defaults[t.task_name] = sch
        say(f"  default {t.task_name}: {_us(secs)}")
    if trials_per_task > 0:
        # xgboost (the `tune` extra) guides the search; without it candidates are drawn at random
        cost_model = "xgb" if _has_xgboost() else "random"
        say(f"searching {trials_per_task} trials per kernel, cost model {cost_model}")
        with _search_log(tdb.path / "logs") as logger:
            for (t, _), rand in zip(tasks, ms.utils.fork_seed(seed, n=len(tasks))):
                # one search per kernel: MetaSchedule's schedule rules fail outright on some fused kernels
                # (compute-at of an epilogue that reads a slice), which would end a joint search for all
                try:
                    ctx = ms.TuneContext(mod=t.dispatched[0], target=target_t, space_generator="post-order-apply",
                                         search_strategy="evolutionary", task_name=t.task_name, logger=logger,
                                         rand_state=rand, num_threads=os.cpu_count() or 1).clone()
                    with target_t:
                        ms.tune_tasks(tasks=[ctx], task_weights=[float(t.weight)], work_dir=str(tdb.path),
                                      max_trials_global=trials_per_task,
                                      num_trials_per_iter=min(32, trials_per_task), builder=builder, runner=runner,
                                      database=search, cost_model=cost_model)
                    searched[t.task_name] = len(search.get_top_k(search.commit_workload(t.dispatched[0]),
                                                                 1 << 30)) - base_records[t.task_name]
                    say(f"  searched {t.task_name} ({searched[t.task_name]} candidates measured)")
                except Exception as e:  # noqa: BLE001
                    failed[t.task_name] = f"{type(e).__name__}: {str(e).splitlines()[-1][:200]}"
                    say(f"  search failed on {t.task_name}: {failed[t.task_name]}")
    report.trials, report.failed = sum(searched.values()), failed
    chosen = []
    for t, args in tasks:
        mod = t.dispatched[0]
        cands = _candidates(mod, defaults[t.task_name], search, tdb.database)
        times = _remeasure(mod, cands, args, spec, builder, runner)
        pick, label = _choose(cands, times)
        if pick is None:
            continue  # nothing ran, not even the default: a build keeps the default rules for it
        chosen.append((mod, cands[pick][1], times[pick], args))
        default = _median(times[0]) * 1e6 if times[0] else None
        report.tasks.append(TaskResult(t.task_name, int(t.weight), default, _median(times[pick]) * 1e6, label,
                                       searched.get(t.task_name, 0)))
        say(f"  {t.task_name}: {label} ({_us(times[pick])} vs default {_us(times[0])})")
    tdb.rewrite(chosen, target_t)
    report.seconds = time.perf_counter() - t_start
    TuningDatabase._write_manifest(tdb.path, spec, report)
    return report


def _us(secs) -> str:
    return "failed" if not secs else f"{_median(secs) * 1e6:.2f} us"


def _median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _candidates(mod, default_sch, search, previous) -> list:
    """[(label, trace)]: the default schedule first, then the search's best few and the database's
    earlier record for this kernel, without repeats."""
    out, seen = [], set()

    def add(label, trace):
        key = str(trace)
        if key not in seen:
            seen.add(key)
            out.append((label, trace))
    if default_sch is not None:
        add("default", default_sch.trace)
    else:
        out.append(("default", None))
    if search.has_workload(mod):
        for r in search.get_top_k(search.commit_workload(mod), RECHECK + 1):
            add("tuned", r.trace)
    if previous.has_workload(mod):
        for r in previous.get_top_k(previous.commit_workload(mod), 1):
            add("tuned", r.trace)  # (kept only if it beats the default again, here and now)
    return out


def _remeasure(mod, cands, args, spec, builder, runner) -> list:
    """Each candidate's run times, measured in ROUNDS turns (A B C A B C ...) so drift hits all alike."""
    from tvm import s_tir  # deferred: the TVM compiler (module docstring)
    mods = []
    for _, trace in cands:
        if trace is None:
            mods.append(None)
            continue
        try:
            sch = s_tir.Schedule(mod)
            trace.apply_to_schedule(sch, remove_postproc=False)
            mods.append(sch.mod)
        except Exception:  # noqa: BLE001 -- a trace that no longer replays (an old record) is no candidate
            mods.append(None)
    times = [[] for _ in cands]
    for _ in range(ROUNDS):
        for i, m in enumerate(mods):
            secs = _measure(m, args, spec, builder, runner) if m is not None else None
            if secs:
                times[i] += secs
    return times


def _choose(cands, times) -> tuple:
    """(index, "default" | "tuned"): the fastest candidate if it beats the default by MARGIN, else the
    default; (None, None) when nothing ran."""
    ran = [i for i, t in enumerate(times) if t]
    if not ran:
        return None, None
    best = min(ran, key=lambda i: _median(times[i]))
    if 0 in ran and (best == 0 or _median(times[best]) > (1 - MARGIN) * _median(times[0])):
        return 0, "default"
    return best, cands[best][0]


class _search_log:
    """MetaSchedule's loggers for one tuning run: a file under db/logs, nothing on the console.

    (MetaSchedule's own setup, create_loggers, calls logging.config.dictConfig, which closes every other
    logging handler of the process, and prints a table to stdout after every batch.)"""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir

    def __enter__(self):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.logger = logging.getLogger("llmasos.tuning.metaschedule")
        self.handler = logging.FileHandler(self.log_dir / "tuning.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        # the task scheduler logs through its module logger: keep it off the console too
        self.ms = logging.getLogger("tvm.s_tir.meta_schedule")
        self.ms_saved = (self.ms.level, self.ms.propagate)
        self.ms.addHandler(self.handler)
        self.ms.setLevel(logging.INFO)
        self.ms.propagate = False
        return self.logger

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.ms.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]
        self.ms.setLevel(self.ms_saved[0])
        self.ms.propagate = self.ms_saved[1]
        self.handler.close()
        return False


def _has_xgboost() -> bool:
    try:
        import xgboost  # noqa: F401 -- deferred: optional (the `tune` extra), and slow to import
        return True
    except ImportError:
        return False
