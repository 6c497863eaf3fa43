"""Executes a Plan on one rank: the setup steps in the order the plan prints, then the training
loop, written out. Every failure is raised as a RunFailure naming the plan step and its .dsg line."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from dsgraph.runtime import adapters, builtins, checkpoint, configs, control, data, memory, sources
from dsgraph.runtime.engines import Backend
from dsgraph.runtime.evaluate import Scope, evaluate
from dsgraph.runtime.export import export_model
from dsgraph.runtime.metrics import Metrics


class RunFailure(Exception):
    """A failure at a known place: the plan step (or training-step entry) and its .dsg span."""

    def __init__(self, where: str, span: dict | None, cause: BaseException):
        self.where, self.span, self.cause = where, span, cause
        location = f"{span['file']}:{span['line']}:{span['col']}" if span else "?"
        super().__init__(f"{where} ({location}): {type(cause).__name__}: {cause}")

    def to_json(self) -> dict:
        return {"where": self.where, "span": self.span, "error": f"{type(self.cause).__name__}: {self.cause}"}


@contextlib.contextmanager
def step_context(where: str, span: dict | None):
    try:
        yield
    except RunFailure:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the place it happened
        raise RunFailure(where, span, error) from error


def model_seed(pipeline_seed: int, name: str) -> int:
    """Every rank (and a single-process replica) builds model `name` from the same seed."""
    return (pipeline_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


class Executor:
    def __init__(self, plan: dict, run_dir: Path, rank: int, world: int):
        self.plan, self.run_dir, self.rank, self.world = plan, run_dir, rank, world
        self.settings = plan["settings"]
        self.base_dir = Path(plan["file"]).parent
        self.models = {m["name"]: m for m in plan["models"]}
        self.backend = Backend()
        self.configs: dict[str, dict] = {}
        self.datasets: dict[str, Any] = {}
        self.batches: dict[str, data.Batches] = {}
        self.total_steps = 0
        self.executed: list[dict] = []        # what ran, in order (tests compare it with the plan)
        self._factories: dict[str, Any] = {}
        self.heartbeat = control.Heartbeat(run_dir, rank)
        self.first_step = 0                   # > 0 when resuming
        self.resume_rng: dict | None = None
        self.stopped_early = False
        self.last_step = 0

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        sources.set_import_path(self.plan["file"])
        for d in self.plan["data"]:
            with step_context(f"building data set `{d['name']}`", d["span"]):
                self.datasets[d["name"]] = sources.build(d["source"], sources.data_table(), self.base_dir)
        self.total_steps = self._total_steps()
        for name, m in self.models.items():
            hidden = configs.hidden_size_of_source(m["source"], self.base_dir)
            self.configs[name] = configs.finalize(m, self.world, self.total_steps, hidden, self.backend.on_cpu)
        if not any(s["op"] == "create_accelerator" for s in self.plan["setup"]):
            self.backend.init_distributed()
        built: dict[str, Any] = {}
        for step in self.plan["setup"]:
            where = f"setup step {step['id']} ({step['op']} {step.get('model') or step.get('data') or ''})".rstrip()
            with step_context(where.replace(" )", ")"), step["span"]):
                self._setup_step(step, built)
            self.executed.append({"id": step["id"], "op": step["op"], "model": step.get("model")})
        self.backend.check_world(self.rank, self.world)
        if self.rank == 0:      # the exact configs handed to DeepSpeed, "auto" resolved
            out = self.run_dir / "deepspeed_configs"
            out.mkdir(exist_ok=True)
            for name, config in self.configs.items():
                (out / f"{name}.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        resume = os.environ.get("DSGRAPH_RESUME")
        if resume:
            manifest = json.loads(Path(resume).read_text())
            with step_context(f"resuming from {Path(resume).name}", None):
                checkpoint.load(self, manifest)
            self.first_step = manifest["step"]

    def _setup_step(self, step: dict, built: dict[str, Any]) -> None:
        op = step["op"]
        if op == "create_accelerator":
            plugins = {name: self.configs[name] for name in step["plugins"]}
            self.backend.create_accelerator(step["accelerator"], plugins, step.get("mixed_precision"))
        elif op == "select_plugin":
            self.backend.select_plugin(step["model"])
        elif op == "build_model":
            built[step["model"]] = self._build_model(step["model"])
        elif op == "prepare":
            m = self.models[step["model"]]
            self.backend.prepare(step["accelerator"], m["name"], built.pop(m["name"]), [], m["stage"],
                                 m["precision"], m["role"] == "trained")
        elif op == "initialize":
            m = self.models[step["model"]]
            self.backend.initialize(m["name"], built.pop(m["name"]), self.configs[m["name"]], m["stage"],
                                    m["precision"], m["role"] == "trained")
        elif op == "shard_data":
            name = step["data"]
            index = [d["name"] for d in self.plan["data"]].index(name)
            loader = data.sharded_loader(self.datasets[name], self.settings["micro_batch"],
                                         data.data_seed(self.settings["seed"], index), self.rank, self.world)
            self.batches[name] = data.Batches(loader, name)
        else:
            raise ValueError(f"unknown setup operation {op!r} (plan from a newer dsgraph?)")

    def _build_model(self, name: str):
        m = self.models[name]
        config = self.configs[name]
        torch.manual_seed(model_seed(self.settings["seed"], name))
        with self.backend.build_context(name, config, m["stage"], m["source"]["kind"] == "hf"):
            model = sources.build(m["source"], sources.model_table(), self.base_dir)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"the source of `{name}` returned {type(model).__name__}, not a torch.nn.Module")
        if m.get("lora"):      # only the adapter is trained; ZeRO-3 partitions it at initialize
            model = adapters.apply_lora(model, m["lora"], model_seed(self.settings["seed"], f"{name}/lora"),
                                        sources.model_task(m["source"], model))
        if m["stage"] != 3 and configs.hidden_size_of_source(m["source"], self.base_dir) is None:
            # Sized from the built model now, before prepare/initialize read the config.
            self.configs[name].update(configs.finalize(m, self.world, self.total_steps,
                                                       configs.hidden_size_of_model(model), self.backend.on_cpu))
            self.backend.update_plugin_config(name, self.configs[name])
        return model

    def _total_steps(self) -> int:
        if self.settings["steps"] is not None:
            return self.settings["steps"]
        per_epoch = min(len(ds) // (self.settings["micro_batch"] * self.world) for ds in self.datasets.values())
        return max(1, self.settings["epochs"] * per_epoch // self.settings["grad_accum"])

    # -- training --------------------------------------------------------------------------

    def _factory(self, target: str):
        if target not in self._factories:
            self._factories[target] = sources.resolve_factory(target)
        return self._factories[target]

    def train(self) -> Metrics:
        plan, backend, device = self.plan, self.backend, self.backend.device()
        memory.watch(backend.models)      # measured once, as the second optimizer step begins
        # The libraries and engines set up so far are millions of objects: a full garbage
        # collection in the loop scans them all (~0.4 s on 2 CPU cores, stalling every rank at the
        # next collective). Collect once now, then leave them out of later collections.
        gc.collect()
        gc.freeze()
        forwards = [s for s in plan["step"] if s["op"] == "forward"]
        groups = [(s, b) for s, b in zip([s for s in plan["step"] if s["op"] == "losses"],
                                           [s for s in plan["step"] if s["op"] == "backward"])]
        trained = [m for m in plan["models"] if m["role"] == "trained"]
        log_every, accum = self.settings["log_every"], self.settings["grad_accum"]
        global_batch = self.settings["micro_batch"] * self.world * accum
        metrics = Metrics(self.run_dir, self.rank, self.total_steps, plan["pipeline"], self.first_step)
        names = [t["name"] for losses, _ in groups for name in losses["losses"]
                 for t in plan["losses"][name]["terms"]]
        loss_names = [name for losses, _ in groups for name in losses["losses"]]
        stat_names = [f"{t['name']}.{stat}" for losses, _ in groups for name in losses["losses"]
                      for t in plan["losses"][name]["terms"] for stat in t.get("stats", ())]
        size = len(loss_names) + len(names) + len(stat_names)     # the sums kept on logged steps
        torch.manual_seed(self.settings["seed"] * 7919 + self.rank)   # dropout differs per rank
        if self.resume_rng is not None:
            checkpoint.set_rng_state(self.resume_rng)
        tick, last_logged = time.perf_counter(), self.first_step
        self.heartbeat.beat(control.TRAINING, self.first_step)
        for step in range(self.first_step + 1, self.total_steps + 1):
            logged = step % log_every == 0 or step == self.total_steps
            # Loss values stay on the device: reading them every step would sync a GPU every step.
            # They are summed only for the steps that are logged (the others' sums were never read).
            totals = torch.zeros(size, dtype=torch.float64, device=device) if logged else None
            for _ in range(accum):
                scope = Scope({n: _to_device(b.next(), device) for n, b in self.batches.items()})
                with self._accumulate():
                    for f in forwards:
                        with step_context(f"forward `{f['call']}`", f["span"]):
                            scope.detach = frozenset(f["detach"])
                            args = [evaluate(a, scope, self._factory) for a in f["args"]]
                            kwargs = {k: evaluate(v, scope, self._factory) for k, v in f["kwargs"].items()}
                            # Frozen models: no autograd graph, no activations kept.
                            with torch.no_grad() if f["no_grad"] else contextlib.nullcontext():
                                scope.calls[f["call"]] = backend.forward(f["model"], args, kwargs)
                    self._group_updates(groups, scope, totals, loss_names, names, stat_names)
            if logged:
                mean = backend.all_reduce_mean(totals / accum).tolist()   # sync point: once per logged step
                now = time.perf_counter()
                record = {"step": step,
                          "losses": {n: float(mean[i]) for i, n in enumerate(loss_names)},
                          "terms": {n: float(mean[len(loss_names) + i]) for i, n in enumerate(names)},
                          "stats": {n: float(mean[size - len(stat_names) + i]) for i, n in enumerate(stat_names)},
                          "lr": {m["name"]: backend.learning_rate(m["name"]) for m in trained},
                          "samples_per_s": round(global_batch * (step - last_logged) / max(now - tick, 1e-9), 2)}
                metrics.log(record)
                tick, last_logged = now, step
            metrics.advance()
            self.last_step = step
            self.heartbeat.beat(control.TRAINING, step)      # a memory store, no system call
            stop = control.stop_step(self.run_dir)          # the driver asks for a clean stop
            every = self.settings["checkpoint_every"]
            if (every and step % every == 0) or (stop == step and every):
                self.heartbeat.beat(control.SETUP, step)    # saving may take long: setup's timeout
                checkpoint.save(self, step)
                self.heartbeat.beat(control.TRAINING, step)
            if stop == step:
                self.stopped_early = True
                break
        return metrics

    def _accumulate(self):
        """Accelerate decides the accumulation boundary inside `accumulate()`; native engines count
        micro steps themselves."""
        stack = contextlib.ExitStack()
        for m in self.plan["models"]:
            if m["role"] == "trained" and m["engine"] == "accelerate":
                accelerator = self.backend.accelerators[m["accelerator"]]
                stack.enter_context(accelerator.accumulate(self.backend.models[m["name"]].engine))
        return stack

    def _group_updates(self, groups, scope: Scope, totals, loss_names, term_names, stat_names) -> None:
        for losses_step, backward_step in groups:
            scope.detach = frozenset(losses_step["detach"])
            scope.losses = {}
            for name in losses_step["losses"]:
                with step_context(f"loss `{name}`", self.plan["losses"][name]["span"]):
                    value = None
                    for term in self.plan["losses"][name]["terms"]:
                        if totals is not None and term.get("stats"):     # a logged step: keep what it reports
                            with builtins.recording_stats() as stats:
                                term_value = evaluate(term["expr"], scope, self._factory)
                            first = len(loss_names) + len(term_names)
                            for stat in term["stats"]:
                                totals[first + stat_names.index(f"{term['name']}.{stat}")] += stats[stat]
                        else:
                            term_value = evaluate(term["expr"], scope, self._factory)
                        if totals is not None:
                            totals[len(loss_names) + term_names.index(term["name"])] += _detached(term_value)
                        weighted = term["weight"] * term_value
                        value = weighted if value is None else value + weighted
                    if not isinstance(value, torch.Tensor) or value.dim() != 0:
                        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                        raise ValueError(f"loss `{name}` must be a single number (a 0-d tensor), got {shape}")
                    scope.losses[name] = value
                    if totals is not None:
                        totals[loss_names.index(name)] += value.detach()
            models, engine = backward_step["models"], backward_step["engine"]
            accelerator = self.models[models[0]]["accelerator"]
            with step_context(f"backward of `{backward_step['loss']}`", backward_step["span"]):
                self.backend.backward(models, engine, scope.losses[backward_step["loss"]], accelerator)
                self.backend.step(models, engine)     # optimizer step at the accumulation boundary

    # -- checkpoints and the end -----------------------------------------------------------

    def export(self) -> list[Path]:
        out = []
        for m in self.plan["models"]:
            if m["role"] == "trained":
                path = export_model(self.backend, m, self.run_dir / "models")
                if path is not None:
                    out.append(path)
        return out

    def write_rank_report(self) -> None:
        """What this rank executed and held, for tests and for the driver's summary."""
        digests = {}
        for m in self.plan["models"]:
            if m["role"] == "frozen":
                state = self.backend.full_state_dict(m["name"])     # collective: all ranks gather
                if state is not None:
                    digests[m["name"]] = state_digest(state)
        report = {"rank": self.rank, "executed": self.executed, "frozen_digests": digests,
                  "backend_calls": self.backend.calls,
                  "shards": {name: self.backend.local_shard_numels(name) for name in self.backend.models},
                  "memory": memory.report(self.backend.models),
                  "epochs": {name: b.sampler.epoch for name, b in self.batches.items()},
                  "samples": {name: b.sampler.served for name, b in self.batches.items()}}
        (self.run_dir / "ranks").mkdir(exist_ok=True)
        (self.run_dir / "ranks" / f"rank{self.rank}.json").write_text(json.dumps(report, indent=2) + "\n")


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's exact bits: equal digests mean bit-identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value
