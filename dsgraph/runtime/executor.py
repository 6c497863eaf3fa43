"""Executes a Plan on one rank: its setup steps, then its training step, each dispatched on its
kind in the order the plan lists (the order `dsgraph compile` prints). Every failure is raised as
a RunFailure naming the step and its .dsg line. The loop is written out in `train`; every
DeepSpeed and Accelerate call goes through the Backend."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsgraph import plan as P
from dsgraph.compat import assert_never
from dsgraph.context import RunContext
from dsgraph.runtime import (
    adapters,
    builtins,
    cache,
    checkpoint,
    configs,
    control,
    data,
    generation,
    manifest,
    measure,
    rundir,
    sources,
)
from dsgraph.runtime.engines import Backend
from dsgraph.runtime.evaluate import Scope, evaluate, project
from dsgraph.runtime.export import export_model
from dsgraph.runtime.meter import EvalMeter, Meter
from dsgraph.runtime.metrics import Metrics
from dsgraph.runtime.trackers import Trackers
from dsgraph.source import Span


class RunFailure(Exception):
    """A failure at a known place: the plan step (or op) and its .dsg span."""

    def __init__(self, where: str, span: Span | None, cause: BaseException):
        self.where, self.span, self.cause = where, span, cause
        super().__init__(f"{where} ({span or '?'}): {type(cause).__name__}: {cause}")

    def to_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "span": self.span.to_json() if self.span else None,
            "error": f"{type(self.cause).__name__}: {self.cause}",
        }


@contextlib.contextmanager
def writing(where: str, path: Path) -> Iterator[None]:
    """A fault of the machine while writing (a full disk, a read-only file system) is reported
    with the place and the path it concerns; any other error passes through."""
    try:
        yield
    except Exception as error:
        cause = rundir.environment_cause(error, path)
        if cause is None:
            raise
        if cause.filename is None:
            cause.filename = str(path)
        raise RunFailure(where, None, cause) from error


def model_seed(pipeline_seed: int, name: str) -> int:
    """Every rank (and a single-process replica) builds model `name` from the same seed."""
    return (pipeline_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def _where(step: P.SetupStep | P.StepOp | P.EvalLoss | P.PrecomputeStep) -> str:
    """How a failure names the step: `setup step 3 (build_model student)`, `loss `kd``."""
    match step:
        case P.Forward(text=text):
            return f"forward `{text}`"
        case P.ComputeLoss(loss=loss) | P.EvalLoss(loss=loss):
            return f"loss `{loss}`"
        case P.Backward() | P.OptimizerStep() | P.NextBatch():
            return f"step op {step.id} ({step.kind})"
        case P.ReadCache(entry=entry):
            return f"step op {step.id} (read_cache {entry})"
        case P.Generate(generation=name, model=model, data=data):
            return f"generating `{name}` from `{model}` over `{data}`"
        case P.ScoreReward(call=call):
            return f"reward `{call}`"
        case P.FillCache(text=text, data=data):
            return f"precompute `{text}` over `{data}`"
        case P.ReleaseModel(model=name):
            return f"releasing `{name}`"
        case _:
            subject = getattr(step, "model", None) or getattr(step, "data", None)
            return f"setup step {step.id} ({step.kind}{' ' + subject if subject else ''})"


class Executor:
    def __init__(self, plan: P.Plan, run_dir: Path, rank: int, world: int, run_id: str, resume: Path | None = None):
        self.plan, self.run_dir, self.rank, self.world, self.run_id = plan, run_dir, rank, world, run_id
        self.resume = resume  # a checkpoint manifest the driver checked
        self.settings = plan.settings
        self.base_dir = Path(plan.file).parent
        self.backend = Backend()
        self.configs: dict[str, dict[str, Any]] = {}  # complete: what DeepSpeed gets
        self.datasets: dict[str, Any] = {}
        self.batches: dict[str, data.Batches] = {}
        self.eval_shards: dict[str, data.EvalShard] = {}
        self.built: dict[str, nn.Module] = {}  # built, not yet handed to an engine
        self.executed: list[int] = []  # setup step ids, in the order run
        self.executed_step: list[int] = []  # op ids of the first optimizer step
        self.executed_precompute: list[int] = []  # precompute step ids, in the order run
        self.heartbeat = control.Heartbeat(run_dir, rank, run_id)
        self.first_step = 0  # > 0 when resuming
        self.resume_rng: dict[str, str] | None = None
        self.stopped_early = False
        self.metrics: Metrics | None = None
        self.last_step = 0
        self._total_steps: int | None = None
        self._factories: dict[str, Callable[..., Any]] = {}
        self._groups = {g.index: (g.loss, tuple(m.name for m in plan.models_of(g.index))) for g in plan.groups}
        # The data sets whose batches carry their sample indices: the cache's rows are read by them.
        reads = [*plan.step, *(plan.evaluation.step if plan.evaluation else ())]
        self.indexed = frozenset(op.data for op in reads if isinstance(op, P.ReadCache))
        self.cached: dict[tuple[str, str], cache.Arrays] = {}  # (entry, data set) -> its rows
        self.precomputed: list[dict[str, Any]] = []  # what each fill did, for the report
        self.memory_phases: dict[str, Any] = {}
        # Sampling draws from a generator per generation and rank; checkpoints keep its state.
        self.generators: dict[str, torch.Generator] = {}
        self.generated: dict[str, dict[str, Any]] = {}  # per generation: what it did, for the report
        self._decoded = frozenset(op.generation for op in plan.step if isinstance(op, P.ScoreReward))
        # `iterations = k`: a generation's prompts, rollouts and rewards kept for k optimizer
        # steps (per micro step), made anew at steps 1, 1 + k, ... (`_kept_for`: by what they are)
        self._iterations = {g.name: g.iterations for g in plan.generations if g.iterations > 1}
        self._kept_for: dict[str, int] = {}
        for g in plan.generations:
            if g.iterations > 1:
                self._kept_for[g.data] = self._kept_for[g.name] = g.iterations
        for op in plan.step:
            if isinstance(op, P.ScoreReward) and op.generation in self._iterations:
                self._kept_for[op.call] = self._iterations[op.generation]
        self._kept: dict[tuple[str, int], Any] = {}
        self._at = (0, 0)  # (optimizer step, micro step) being run
        # Where a step's time goes, logged beside the losses of a pipeline that generates.
        self._phase_of = {op.id: _phase(op) for op in plan.step} if plan.generations else {}

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        sources.set_import_path(self.plan.file)
        for step in self.plan.setup:
            try:
                self._setup_step(step)
            except Exception as error:
                raise RunFailure(_where(step), step.span, error) from error
            self.executed.append(step.id)
        self.backend.check_world(self.rank, self.world)
        if self.rank == 0:  # the exact configs handed to DeepSpeed, "auto" resolved
            out = self.run_dir / "deepspeed_configs"
            out.mkdir(exist_ok=True)
            for name, config in self.configs.items():
                rundir.write_new(out / f"{name}.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.resume is not None:
            try:
                manifest = checkpoint.load(self, self.resume)
            except Exception as error:
                raise RunFailure(f"resuming from {self.resume.name}", None, error) from error
            self.first_step = manifest.step

    def _setup_step(self, step: P.SetupStep) -> None:
        plan, backend = self.plan, self.backend
        match step:
            case P.InitProcessGroup():
                backend.init_distributed()
            case P.BuildData(data=name):
                self.datasets[name] = sources.build(
                    plan.data_set(name).source, sources.data_table(), self.base_dir, run=self._context()
                )
            case P.CompleteConfig(model=name):
                model = plan.model(name)
                width = configs.width(model, self.base_dir, self.built.get(name))
                self.configs[name] = configs.complete(model, self.world, self.total_steps, width, backend.on_cpu)
            case P.CreateAccelerator(accelerator=index, plugins=plugins):
                backend.create_accelerator(
                    index, {name: self.configs[name] for name in plugins}, plan.mixed_precision(step)
                )
            case P.SelectPlugin(model=name):
                backend.select_plugin(name)
            case P.BuildModel(model=name):
                self.built[name] = self._build_model(plan.model(name))
            case P.Prepare(model=name):
                model = plan.model(name)
                assert model.accelerator is not None
                module = self.built.pop(name)
                optimizer = self._client_optimizer(model, module)
                backend.prepare(name, model.accelerator, module, model.engine_objects, model.precision, optimizer)
            case P.Initialize(model=name):
                model = plan.model(name)
                module = self.built.pop(name)
                optimizer = self._client_optimizer(model, module)
                backend.initialize(name, module, self.configs[name], model.engine_objects, model.precision, optimizer)
            case P.ShardData(data=name):
                index = [d.name for d in plan.data].index(name)
                declared = plan.data_set(name)
                dataset, collate = self._dataset(name)
                loader = data.sharded_loader(
                    dataset,
                    self.settings.micro_batch,
                    data.data_seed(self.settings.seed, index),
                    self.rank,
                    self.world,
                    declared.shuffle,
                    declared.drop_last,
                    declared.workers,
                    collate,
                )
                self.batches[name] = data.Batches(loader, name)
            case P.ShardEval(data=name):
                declared = plan.data_set(name)
                dataset, collate = self._dataset(name)
                shard = data.EvalShard(
                    dataset, self.settings.micro_batch, self.rank, self.world, declared.workers, collate
                )
                self.eval_shards[name] = shard
            case _:
                assert_never(step)

    def _build_model(self, m: P.Model) -> nn.Module:
        torch.manual_seed(model_seed(self.settings.seed, m.name))
        # 4-bit weights: loaded whole (the plan says so at ZeRO-3), packed in the model's dtype.
        quantization = adapters.quantization_config(m.quantize, m.precision) if m.quantize else None
        # ZeRO-3: partitioned as built, so its config is complete (CompleteConfig came first).
        with self.backend.build_context(
            m.name, self.configs.get(m.name, {}), m.zero_init, m.source.kind is P.SourceKind.HF
        ):
            run = self._context(model_seed(self.settings.seed, m.name))
            model = sources.build(m.source, sources.model_table(), self.base_dir, run=run, quantization=quantization)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the source of `{m.name}` returned {type(model).__name__}, not a torch.nn.Module")
        if m.quantize and m.trained:  # QLoRA: base frozen, unquantized weights fp32, checkpointing
            model = adapters.prepare_4bit_training(model, m.gradient_checkpointing)
        elif m.gradient_checkpointing:  # activations recomputed in the backward: less memory, more time
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # Transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if m.lora:  # only the adapter is trained; ZeRO-3 partitions it at prepare/initialize
            model = adapters.apply_lora(
                model, m.lora, model_seed(self.settings.seed, f"{m.name}/lora"), sources.model_task(m.source, model)
            )
        if m.quantize:  # before any forward: ZeRO-3 must gather the layout it partitioned
            adapters.keep_4bit_layout(model)
        return model

    def _client_optimizer(self, m: P.Model, module: nn.Module) -> Any:
        """`optimizer = pkg.mod:make(...)`: the factory's optimizer over the trainable parameters
        (a ZeRO-3 model's are partitioned already; DeepSpeed wraps it either way)."""
        if m.client_optimizer is None:
            return None
        _, keywords = sources.call_args(m.client_optimizer.args)
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = self._factory(m.client_optimizer.target)(trainable, **keywords)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{m.client_optimizer.target} returned {type(optimizer).__name__}, not a torch optimizer")
        return optimizer

    def _collate(self, declared: P.DataSet) -> Callable[[list[Any]], Any] | None:
        """`collate = pkg.mod:make(...)`: the collate function the factory returns."""
        if declared.collate is None:
            return None
        collate = sources.build(declared.collate, {}, self.base_dir, run=self._context())
        if not callable(collate):
            raise TypeError(f"{declared.collate.target} returned {type(collate).__name__}, not a collate function")
        return collate

    def _dataset(self, name: str) -> tuple[Any, Callable[[list[Any]], Any] | None]:
        """The data set and its collate function; a data set read with the cache gives each batch's
        sample indices beside it."""
        collate = self._collate(self.plan.data_set(name))
        if name in self.indexed:
            return data.indexed(self.datasets[name], collate)
        return self.datasets[name], collate

    def _context(self, seed: int | None = None) -> RunContext:
        s = self.settings
        return RunContext(s.seed, self.rank, self.world, s.micro_batch, s.grad_accum, seed)

    @cached_property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint's resume must share with this run (data files digested once)."""
        return manifest.identity(self.plan, self.base_dir)

    @cached_property
    def eval_sets(self) -> frozenset[str]:
        return frozenset(d.eval for d in self.plan.data if d.eval is not None)

    @property
    def total_steps(self) -> int:
        """`steps`, or what `epochs` passes over the smallest data set give (the data is built
        first in the setup, so this is known before any config is completed)."""
        if self._total_steps is None:
            s = self.settings
            if s.steps is not None:
                self._total_steps = s.steps
            else:
                assert s.epochs is not None
                per_epoch = min(
                    len(ds) // (s.micro_batch * self.world)
                    for name, ds in self.datasets.items()
                    if name not in self.eval_sets
                )
                self._total_steps = max(1, s.epochs * per_epoch // s.grad_accum)
        return self._total_steps

    # -- the precompute phase --------------------------------------------------------------

    def precompute(self) -> None:
        """The plan's precompute steps: each hoisted call over its data set, written to the cache
        (or a matching cache reused), then each cached model released before the loop."""
        pre = self.plan.precompute
        if pre is None:
            return
        root = cache.directory(self.plan, self.run_dir)
        self.heartbeat.beat(control.PRECOMPUTE, 0)
        for step in pre.steps:
            try:
                match step:
                    case P.FillCache():
                        with writing(f"writing the cache of `{step.text}`", root):
                            self._fill(step, root)
                    case P.ReleaseModel(model=name):
                        self._release(name)
                    case _:
                        assert_never(step)
            except RunFailure:
                raise
            except Exception as error:
                raise RunFailure(_where(step), step.span, error) from error
            self.executed_precompute.append(step.id)
        self.heartbeat.beat(control.SETUP, 0)

    def _fill(self, step: P.FillCache, root: Path) -> None:
        """Every rank takes batches r, r+W, ... of the data set in file order and joins every
        forward (a ZeRO-3 forward is a collective; a rank short of a batch in the last round runs
        the first one again and writes nothing); each rank writes its rows in place."""
        assert self.plan.precompute is not None
        started = time.perf_counter()
        entries = [self.plan.precompute.entry(e) for e in step.entries]
        digest = cache.fill_digest(self.plan, step, model_seed(self.settings.seed, step.model), self.base_dir)
        fill = cache.Fill(root, digest, step, entries, self.run_id)
        rows = len(self.datasets[step.data])
        found = self.backend.all_gather_object(fill.complete(rows), self.world)  # every rank sees the same cache
        forwards = 0
        if not all(found):
            fill.arrays = {}
            declared = self.plan.data_set(step.data)
            shard = data.EvalShard(
                self.datasets[step.data],
                self.settings.micro_batch,
                self.rank,
                self.world,
                declared.workers,
                self._collate(declared),
            )
            device = self.backend.device()
            batches = zip(shard.indices, shard.weights, shard.loader, strict=True)
            for number, (indices, weight, batch) in enumerate(self._fill_progress(batches, len(shard), step)):
                scope = Scope(batches={step.data: _to_device(batch, device)})
                args = [evaluate(a, scope, (), self._factory) for a in step.args]
                kwargs = {k: evaluate(v, scope, (), self._factory) for k, v in step.kwargs}
                with torch.no_grad():  # the model is frozen and in eval mode; ZeRO-3 gathers per layer
                    out = self.backend.forward(step.model, args, kwargs)
                values = {e.id: cache.to_cache(_at(out, e.path), e) for e in entries}
                forwards += 1
                if number == 0:  # the arrays take the shapes of the first batch's rows
                    if self.rank == 0:
                        fill.create(rows, values)
                    self.backend.barrier()
                if weight:
                    fill.write(indices, values)
                self.heartbeat.beat(control.PRECOMPUTE, 0)  # a long precompute is not a hang
            fill.flush()
            self.backend.barrier()  # every rank's rows are on disk
            if self.rank == 0:
                fill.commit(rows, time.perf_counter() - started)
            self.backend.barrier()
            fill.open(fill.final)
        for entry in entries:
            self.cached[entry.id, step.data] = fill.arrays[entry.id]
        self.precomputed.append(
            {
                "step": step.id,
                "call": step.text,
                "data": step.data,
                "rows": rows,
                "reused": all(found),
                "forwards": forwards,
                "seconds": round(time.perf_counter() - started, 3),
                "digest": digest,
            }
        )

    def _fill_progress(self, batches: Any, total: int, step: P.FillCache) -> Any:
        if self.rank != 0 or total < 20:
            return batches
        from tqdm import tqdm

        return tqdm(batches, total=total, desc=f"precompute {step.text}", unit="batch", leave=False, file=sys.stderr)

    def _release(self, name: str) -> None:
        """The model's engine destroyed and its memory given back; measured on either side: the
        bytes of every live tensor of this rank (and of CUDA's allocator on a GPU)."""
        handle = self.backend.models[name]
        held = measure.measure(handle.engine)
        gc.collect()
        before = measure.live_tensor_bytes()
        engine = weakref.ref(handle.engine)
        del handle
        self.backend.release(name)
        after = measure.live_tensor_bytes()
        self.memory_phases[name] = {
            "model": held,
            "live_before": before,
            "live_after": after,
            "engine_freed": engine() is None,
        }
        if torch.cuda.is_available():
            self.memory_phases[name]["cuda_allocated_after"] = torch.cuda.memory_allocated()

    # -- training --------------------------------------------------------------------------

    def _factory(self, target: str) -> Callable[..., Any]:
        if target not in self._factories:
            self._factories[target] = sources.resolve_factory(target)
        return self._factories[target]

    def train(self) -> Metrics:
        plan, backend, device = self.plan, self.backend, self.backend.device()
        backend.watch_memory()  # measured once, as the second optimizer step begins
        # The libraries and engines set up so far are millions of objects: a full garbage
        # collection in the loop scans them all (~0.4 s on 2 CPU cores, stalling every rank at the
        # next collective). Collect once now, then leave them out of later collections.
        gc.collect()
        gc.freeze()
        trained = [m.name for m in plan.models if m.trained]
        log_every, accum = self.settings.log_every, self.settings.grad_accum
        global_batch = self.settings.micro_batch * self.world * accum
        trackers = None
        if self.rank == 0 and self.settings.track:  # the resolved plan is the run's parameters
            params = json.loads(plan.to_json())
            trackers = Trackers(self.settings.track, self.run_dir, plan.pipeline, params)
        metrics = Metrics(
            self.run_dir,
            self.rank,
            self.total_steps,
            plan.pipeline,
            self.first_step,
            trackers,
            self.settings.rank_metrics,
        )
        self.metrics = metrics
        meter = Meter(plan, device)
        torch.manual_seed(self.settings.seed * 7919 + self.rank)  # dropout differs per rank
        if self.resume_rng is not None:
            checkpoint.set_rng_state(self.resume_rng)
            checkpoint.set_generator_states(self.resume_rng, lambda name: self._generator(name, device))
        tick, last_logged = time.perf_counter(), self.first_step
        phases = dict.fromkeys(PHASES, 0.0)
        self.last_step = self.first_step  # a resume at the last step runs none
        self.heartbeat.beat(control.TRAINING, self.first_step)
        for step in range(self.first_step + 1, self.total_steps + 1):
            logged = step % log_every == 0 or step == self.total_steps
            meter.start(logged)
            for micro in range(accum):
                self._at = (step, micro)
                scope = Scope()
                with backend.accumulate():
                    for op in plan.step:
                        began = time.perf_counter()
                        try:
                            self._step_op(op, scope, meter, device)
                        except Exception as error:
                            raise RunFailure(_where(op), op.span, error) from error
                        if self._phase_of:
                            if device.type == "cuda":  # the op's kernels, not their launch
                                torch.cuda.synchronize()  # a sync point per op of a generating pipeline
                            phases[self._phase_of[op.id]] += time.perf_counter() - began
                        if step == self.first_step + 1:
                            self.executed_step.append(op.id)
            if logged:
                local: dict[str, dict[str, float]] | None = {} if self.settings.rank_metrics else None
                losses, terms, stats = meter.means(backend.all_reduce_mean, accum, local)  # sync point
                if local is not None:
                    metrics.log_rank({"split": "train", "step": step, "rank": self.rank, **local})
                now = time.perf_counter()
                metrics.log(
                    {
                        "split": "train",
                        "step": step,
                        "losses": losses,
                        "terms": terms,
                        "stats": stats,
                        "lr": {name: backend.learning_rate(name) for name in trained},
                        "samples_per_s": round(global_batch * (step - last_logged) / max(now - tick, 1e-9), 2),
                        **self._phases_row(phases, step - last_logged),
                    }
                )
                phases = dict.fromkeys(PHASES, 0.0)
                tick, last_logged = now, step
            metrics.advance()
            self.last_step = step
            if self._evaluates_after(step):
                began = time.perf_counter()
                metrics.log(self.evaluate(step))
                spent = time.perf_counter() - began
                tick += spent  # the step rate and the step times leave evaluations out
                metrics.exclude(spent)
            self.heartbeat.beat(control.TRAINING, step)  # a memory store, no system call
            stop = self.heartbeat.stop_step()  # the driver asks for a clean stop
            every = self.settings.checkpoint_every
            if (every and step % every == 0) or (stop == step and every):
                self.heartbeat.beat(control.CHECKPOINT, step)  # watched like a step
                with writing(f"saving the checkpoint of step {step}", self.run_dir / "ckpt"):
                    checkpoint.save(self, step)
                self.heartbeat.beat(control.TRAINING, step)
            if stop == step:
                self.stopped_early = True
                break
        return metrics

    def _phases_row(self, phases: dict[str, float], steps: int) -> dict[str, Any]:
        """Seconds per optimizer step in each phase (this rank's), for a pipeline that generates."""
        if not self._phase_of:
            return {}
        return {"phase_s": {name: round(spent / max(steps, 1), 4) for name, spent in phases.items()}}

    # -- generation --------------------------------------------------------------------------

    def _reused(self, name: str) -> Any:
        """What `iterations = k` keeps of `name` (a prompts batch, rollouts, rewards) at a step that
        is not the first of its k; None: make it anew (and after a resume at such a step)."""
        every = self._kept_for.get(name, 1)
        step, micro = self._at
        if every == 1 or (step - 1) % every == 0:
            return None
        return self._kept.get((name, micro))

    def _keep(self, name: str, value: Any) -> Any:
        if name in self._kept_for:
            self._kept[name, self._at[1]] = value
        return value

    def _generator(self, name: str, device: torch.device) -> torch.Generator:
        if name not in self.generators:
            seed = model_seed(self.settings.seed * 7919 + self.rank, f"generate/{name}")
            self.generators[name] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[name]

    def _generate(self, op: P.Generate, scope: Scope, device: torch.device) -> generation.Rollouts:
        """Completions of this micro batch's prompts: every rank runs the same number of forwards."""
        spec = self.plan.generation(op.generation)
        batch = scope.batches[op.data]
        tokenizer = getattr(self.datasets[op.data], "tokenizer", None)
        end = getattr(tokenizer, "eos_token_id", None)
        stop = spec.stop + ((end,) if end is not None and end not in spec.stop else ())
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        began = time.perf_counter()
        # no_grad, eval mode; ZeRO-3 `once`: one all-gather of every parameter, released after
        with self.backend.generating(op.model, spec.gather == "once") as module:
            rollouts = generation.sample(
                module,
                batch["input_ids"],
                batch["attention_mask"],
                spec,
                self._generator(spec.name, device),
                stop,
                pad,
                self.backend.any_rank,
            )
        if op.generation in self._decoded:  # rewards read text
            if tokenizer is None:
                raise ValueError(
                    f"data set `{op.data}` has no tokenizer to decode the completions for the rewards "
                    "(builtin.prompts has one; a factory's data set can set `.tokenizer`)"
                )
            special = tuple(i for i in (tokenizer.bos_token_id, end, tokenizer.pad_token_id) if i is not None)
            prompt_length = batch["input_ids"].shape[1]
            rollouts = dataclasses.replace(
                rollouts,
                prompts=generation.decode(
                    tokenizer,
                    rollouts.input_ids[:, :prompt_length],
                    rollouts.attention_mask[:, :prompt_length],
                    special,
                ),
                completions=generation.decode(tokenizer, rollouts.input_ids, rollouts.completion_mask, special),
            )
        gathered = self.backend.gathering(op.model, spec.gather == "once")
        done = self.generated.setdefault(
            op.generation, {"gathered": gathered, "calls": 0, "completions": 0, "tokens": 0, "seconds": 0.0}
        )
        done["calls"] += 1
        done["completions"] += int(rollouts.input_ids.shape[0])
        done["tokens"] += int(rollouts.completion_mask.sum())
        done["seconds"] = round(done["seconds"] + time.perf_counter() - began, 4)
        return rollouts

    def _score(self, op: P.ScoreReward, scope: Scope, device: torch.device) -> torch.Tensor:
        rollouts = scope.rollouts[op.generation]
        reward = self.plan.reward(op.reward)
        if reward.source.kind is P.SourceKind.BUILTIN:
            function = builtins.REWARDS[reward.source.target]
        else:
            function = self._factory(reward.source.target)
        positional, keywords = sources.call_args(reward.source.args)
        values = function(list(rollouts.prompts), list(rollouts.completions), *positional, **keywords)
        scores = torch.as_tensor(values, dtype=torch.float32).to(device)
        rows = rollouts.input_ids.shape[0]
        if scores.numel() != rows:
            raise ValueError(
                f"{reward.source.target} returned {scores.numel()} value(s) for {rows} completions: one number each"
            )
        return scores.reshape(rows, 1)

    # -- evaluation ------------------------------------------------------------------------

    def _evaluates_after(self, step: int) -> bool:
        every = self.settings.eval_every
        return self.plan.evaluation is not None and (step == self.total_steps or (every > 0 and step % every == 0))

    def evaluate(self, step: int) -> dict[str, Any]:
        """One pass over the eval sets after optimizer step `step`: the plan's eval ops for each
        eval batch, every model in eval mode and no autograd graph; the result a metrics row."""
        evaluation, backend, device = self.plan.evaluation, self.backend, self.backend.device()
        assert evaluation is not None
        started = time.perf_counter()
        read = [op.data for op in evaluation.step if isinstance(op, P.NextBatch)]
        shards = [self.eval_shards[name] for name in read]
        if len({len(s) for s in shards}) > 1 or len({tuple(s.weights) for s in shards}) > 1:
            sizes = ", ".join(f"`{name}` {s.size}" for name, s in zip(read, shards, strict=True))
            raise RunFailure("the evaluation", None, ValueError(f"eval sets read together differ in size: {sizes}"))
        meter = EvalMeter(evaluation, device)
        batches = [iter(s.loader) for s in shards]
        weights = shards[0].weights if shards else []
        with backend.evaluating():  # eval mode, no_grad; train mode again after
            for weight in self._eval_progress(weights):
                scope = Scope()
                for op in evaluation.step:
                    try:
                        self._eval_op(op, scope, meter, weight, batches, read, device)
                    except Exception as error:
                        raise RunFailure(f"evaluation: {_where(op)}", op.span, error) from error
                meter.add_batch(weight)
                self.heartbeat.beat(control.EVALUATION, step)  # a long evaluation is not a hang
        samples, losses, terms, stats = meter.results(backend.all_reduce_sum)  # sync point
        self.heartbeat.beat(control.TRAINING, step)
        return {
            "split": "eval",
            "step": step,
            "losses": losses,
            "terms": terms,
            "stats": stats,
            "samples": samples,
            "eval_s": round(time.perf_counter() - started, 4),
        }

    def _eval_progress(self, weights: list[int]) -> Any:
        if self.rank != 0 or len(weights) < 50:
            return weights
        from tqdm import tqdm

        return tqdm(weights, desc="eval", unit="batch", leave=False, file=sys.stderr, disable=None)

    def _eval_op(
        self,
        op: P.EvalOp,
        scope: Scope,
        meter: EvalMeter,
        weight: int,
        batches: list[Iterator[Any]],
        read: list[str],
        device: torch.device,
    ) -> None:
        """One op of an eval batch; `weight` is the batch's samples (0: a padding batch, run so
        that every rank joins every forward, counted for nothing)."""
        match op:
            case P.NextBatch(data=name):
                self._put_batch(scope, name, next(batches[read.index(name)]), device)
            case P.ReadCache(entry=entry, data=name):
                scope.cached[entry] = self.cached[entry, name].rows(scope.indices[name], device)
            case P.Forward():
                args = [evaluate(a, scope, (), self._factory) for a in op.args]
                kwargs = {k: evaluate(v, scope, (), self._factory) for k, v in op.kwargs}
                scope.calls[op.call] = self.backend.forward(op.model, args, kwargs)
            case P.EvalLoss(loss=name):
                assert self.plan.evaluation is not None
                value: Any = None
                for term in self.plan.evaluation.loss(name).terms:
                    with builtins.recording_stats() as stats:
                        term_value = evaluate(term.expr, scope, (), self._factory)
                    if weight:
                        meter.add(term.name, term_value, weight)
                        meter.add_stats(term, stats)
                    weighted = term.weight * term_value
                    value = weighted if value is None else value + weighted
                if not isinstance(value, torch.Tensor) or value.dim() != 0:
                    raise ValueError(f"loss `{name}` must be a single number (a 0-d tensor)")
                scope.losses[name] = value
                if weight:
                    meter.add(name, value, weight)
            case _:
                assert_never(op)

    def _step_op(self, op: P.StepOp, scope: Scope, meter: Meter, device: torch.device) -> None:
        """One op of a micro step."""
        backend = self.backend
        match op:
            case P.NextBatch(data=name):
                batch = self._reused(name)
                self._put_batch(
                    scope, name, batch if batch is not None else self._keep(name, self.batches[name].next()), device
                )
            case P.ReadCache(entry=entry, data=name):  # rows by sample index, from the memory map
                scope.cached[entry] = self.cached[entry, name].rows(scope.indices[name], device)
            case P.Generate(generation=name):  # on-policy: sampled anew each micro step (a forward per token)
                rollouts = self._reused(name)
                scope.rollouts[name] = (
                    rollouts if rollouts is not None else self._keep(name, self._generate(op, scope, device))
                )
            case P.ScoreReward(call=call):
                scores = self._reused(call)
                scope.rewards[call] = scores if scores is not None else self._keep(call, self._score(op, scope, device))
            case P.Forward():
                args = [evaluate(a, scope, op.detach, self._factory) for a in op.args]
                kwargs = {k: evaluate(v, scope, op.detach, self._factory) for k, v in op.kwargs}
                if op.no_grad:  # frozen models: no autograd graph, no activations kept
                    with torch.no_grad():
                        scope.calls[op.call] = backend.forward(op.model, args, kwargs)
                else:
                    scope.calls[op.call] = backend.forward(op.model, args, kwargs)
            case P.ComputeLoss():
                scope.losses[op.loss] = self._loss(op, scope, meter)
            case P.Backward(group=group):
                loss, models = self._groups[group]
                backend.backward(models, scope.losses[loss])
                scope.losses.clear()  # a group's losses are spent by its backward
            case P.OptimizerStep(group=group):
                backend.optimizer_step(self._groups[group][1])  # at the accumulation boundary
            case _:
                assert_never(op)

    def _put_batch(self, scope: Scope, name: str, batch: Any, device: torch.device) -> None:
        if name in self.indexed:  # (sample indices, batch): the indices stay on the CPU
            scope.indices[name], batch = batch[0].numpy(), batch[1]
        scope.batches[name] = _to_device(batch, device)

    def _loss(self, op: P.ComputeLoss, scope: Scope, meter: Meter) -> torch.Tensor:
        """The weighted sum of the loss's terms; on a logged step, each term is metered too."""
        metering = meter.metering(op)
        value: Any = None
        for term in self.plan.loss(op.loss).terms:
            if metering and term.stats:  # a logged step: keep what the loss reports
                with builtins.recording_stats() as stats:
                    term_value = evaluate(term.expr, scope, op.detach, self._factory)
                meter.add_stats(term, stats)
            else:
                term_value = evaluate(term.expr, scope, op.detach, self._factory)
            if metering:
                meter.add(term.name, term_value)
            weighted = term.weight * term_value
            value = weighted if value is None else value + weighted
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"loss `{op.loss}` must be a single number (a 0-d tensor), got {shape}")
        if metering:
            meter.add(op.loss, value)
        return value

    # -- checkpoints and the end -----------------------------------------------------------

    def export(self) -> list[Path]:
        out = []
        for m in self.plan.models:
            if m.trained:
                path = export_model(self.backend, m, self.run_dir / "models")
                if path is not None:
                    out.append(path)
        return out

    def write_rank_report(self) -> None:
        """What this rank executed and held, for tests and for the driver's summary."""
        digests = {}
        for m in self.plan.models:
            if not m.trained and m.name in self.backend.models:  # a released model is gone
                state = self.backend.full_state_dict(m.name)  # collective: all ranks gather
                if state is not None:
                    digests[m.name] = state_digest(state)
        kinds = {s.id: s.kind for s in self.plan.setup}
        op_kinds = {op.id: op.kind for op in self.plan.step}
        pre_kinds = {s.id: s.kind for s in self.plan.precompute.steps} if self.plan.precompute else {}
        report = {
            "rank": self.rank,
            "device": str(self.backend.device()),
            "process_group": str(torch.distributed.get_backend()),
            "executed": [{"id": i, "kind": kinds[i]} for i in self.executed],
            "executed_step": [{"id": i, "kind": op_kinds[i]} for i in self.executed_step],
            "executed_precompute": [{"id": i, "kind": pre_kinds[i]} for i in self.executed_precompute],
            "frozen_digests": digests,
            "backend_calls": self.backend.calls,
            "shards": {name: self.backend.local_shard_numels(name) for name in self.backend.models},
            "memory": self.backend.memory_report(),
            "precompute": self.precomputed,
            "released": self.memory_phases,
            "generated": self.generated,
            "epochs": {name: b.sampler.epoch for name, b in self.batches.items()},
            "samples": {name: b.sampler.served for name, b in self.batches.items()},
        }
        (self.run_dir / "ranks").mkdir(exist_ok=True)
        rundir.write_new(self.run_dir / "ranks" / f"rank{self.rank}.json", json.dumps(report, indent=2) + "\n")


PHASES = ("generate", "score", "train")


def _phase(op: P.StepOp) -> str:
    """generate: sampling; score: the rewards and the frozen models' forwards; train: the rest."""
    match op:
        case P.Generate():
            return "generate"
        case P.ScoreReward():
            return "score"
        case P.Forward() if op.no_grad:
            return "score"
    return "train"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's exact bits: equal digests mean bit-identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _at(value: Any, path: tuple[str, ...]) -> Any:
    """A call's output at an attribute path (`.logits`)."""
    for attr in path:
        value = project(value, attr)
    return value


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
