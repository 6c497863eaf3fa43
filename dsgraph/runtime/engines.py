"""Every DeepSpeed and Accelerate call dsgraph makes, in one place.

`Backend` holds the Accelerators and engines of one rank and exposes the few operations the
executor needs: create/select/prepare (Accelerate), initialize (native DeepSpeed), forward,
backward, step, gather, save."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

import deepspeed  # noqa: E402  (DS_ACCELERATOR is set by the launcher before this import)
from deepspeed.accelerator import get_accelerator

logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
deepspeed.utils.logger.setLevel(logging.ERROR)


@dataclass
class ModelHandle:
    name: str
    engine: Any                      # a DeepSpeedEngine (what Accelerate's prepare returns too)
    stage: int
    precision: str
    trained: bool
    optimizer: Any = None            # Accelerate's optimizer wrapper, when prepared by Accelerate
    scheduler: Any = None


@dataclass
class Backend:
    on_cpu: bool = field(default_factory=lambda: get_accelerator().device_name() == "cpu")
    accelerators: dict[int, Any] = field(default_factory=dict)
    models: dict[str, ModelHandle] = field(default_factory=dict)
    plugin_configs: dict[str, dict] = field(default_factory=dict)
    _hf_configs: list = field(default_factory=list)
    calls: list = field(default_factory=list)     # (operation, model) as executed, for the tests

    # -- process group ---------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return "gloo" if self.on_cpu else get_accelerator().communication_backend_name()

    def init_distributed(self) -> None:
        with _quiet_stdout():
            deepspeed.init_distributed(dist_backend=self.backend_name)

    def check_world(self, rank: int, world: int) -> None:
        """Every layer must agree on who this process is (Accelerate on CPU can silently fall back
        to one process while DeepSpeed runs with several)."""
        seen = {"launcher": (rank, world),
                "torch.distributed": (torch.distributed.get_rank(), torch.distributed.get_world_size()),
                "deepspeed": (deepspeed.comm.get_rank(), deepspeed.comm.get_world_size())}
        if self.accelerators:
            state = self.accelerators[0].state
            seen["accelerate"] = (state.process_index, state.num_processes)
        if len(set(seen.values())) != 1:
            raise RuntimeError("rank/world size disagree: " + ", ".join(f"{k} {v}" for k, v in seen.items()))

    def device(self) -> torch.device:
        if self.on_cpu:
            return torch.device("cpu")
        return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))

    # -- Accelerate's multi-plugin API -----------------------------------------------------

    def create_accelerator(self, index: int, plugins: dict[str, dict], mixed_precision: str | None) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        self.calls.append(("create_accelerator", None))
        if index == 0:
            # The plugins live in the shared AcceleratorState; the first one is the default.
            # gloo must be named on CPU, or Accelerate silently runs single-process.
            self.plugin_configs = plugins
            with _quiet_stdout():      # DeepSpeed prints a line when it loads its comm op
                accelerator = Accelerator(
                    deepspeed_plugins={name: DeepSpeedPlugin(hf_ds_config=cfg) for name, cfg in plugins.items()},
                    mixed_precision=mixed_precision,
                    kwargs_handlers=[InitProcessGroupKwargs(backend=self.backend_name)])
        else:
            accelerator = Accelerator()         # one trained engine per Accelerator
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if accelerator.num_processes != world:
            raise RuntimeError(f"Accelerate sees {accelerator.num_processes} processes, the launcher {world}")
        self.accelerators[index] = accelerator
        return accelerator

    def update_plugin_config(self, name: str, config: dict) -> None:
        """A config completed after its plugin was made (bucket sizes measured on the built
        model): the plugin holds its own copy, which prepare() reads."""
        if self.accelerators:
            plugin = self.accelerators[0].state.deepspeed_plugins.get(name)
            if plugin is not None:
                plugin.hf_ds_config.config.update(copy.deepcopy(config))

    def select_plugin(self, name: str) -> None:
        # Transformers' zero.Init and the next prepare() follow the selected plugin.
        self.accelerators[0].state.select_deepspeed_plugin(name)
        self.calls.append(("select_plugin", name))

    def prepare(self, index: int, name: str, model, loaders: list, stage: int, precision: str,
                trained: bool) -> list:
        from accelerate.utils import DummyOptim, DummyScheduler

        self.calls.append(("prepare", name))
        accelerator = self.accelerators[index]
        config = self.plugin_configs[name]
        if not trained:
            model.requires_grad_(False)
            engine = accelerator.prepare(model)
            engine.eval()
            self.models[name] = ModelHandle(name, engine, stage, precision, False)
            return loaders
        # The optimizer and scheduler are built by DeepSpeed from the config; Accelerate takes
        # placeholders for them.
        optimizer = DummyOptim([p for p in model.parameters() if p.requires_grad])   # LoRA: the adapter only
        objects = [model, optimizer]
        if "scheduler" in config:
            objects.append(DummyScheduler(optimizer))
        prepared = accelerator.prepare(*objects, *loaders)
        engine, optimizer = prepared[0], prepared[1]
        scheduler = prepared[2] if "scheduler" in config else None
        engine.train()
        self.models[name] = ModelHandle(name, engine, stage, precision, True, optimizer, scheduler)
        return list(prepared[len(objects):])

    # -- native engines --------------------------------------------------------------------

    def initialize(self, name: str, model, config: dict, stage: int, precision: str, trained: bool) -> None:
        self.calls.append(("initialize", name))
        if not trained:
            model.requires_grad_(False)
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
        else:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                              if p.requires_grad], config=config)
            engine.train()
        self.models[name] = ModelHandle(name, engine, stage, precision, trained)

    # -- building --------------------------------------------------------------------------

    def build_context(self, name: str, config: dict, stage: int, is_hf: bool):
        """ZeRO-3 models are partitioned as they are built. Transformers does it itself when a
        DeepSpeed config is active (Accelerate's selected plugin, or an HfDeepSpeedConfig)."""
        self.calls.append(("build_model", name))
        if stage != 3:
            return contextlib.nullcontext()
        if is_hf:
            if not self.accelerators:
                from transformers.integrations import HfDeepSpeedConfig
                self._hf_configs.append(HfDeepSpeedConfig(config))    # must stay alive while building
            return contextlib.nullcontext()
        return deepspeed.zero.Init(config_dict_or_path=config)

    # -- the training step -----------------------------------------------------------------

    def forward(self, name: str, args: list, kwargs: dict) -> Any:
        handle = self.models[name]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(handle.precision)
        if dtype is not None:       # per-model precision: inputs in the model's dtype ...
            args = [_cast(a, dtype) for a in args]
            kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        out = handle.engine(*args, **kwargs)   # ZeRO-3: gathers each layer's parameters on the fly
        return _cast(out, torch.float32) if dtype is not None else out    # ... outputs back to fp32

    def backward(self, models: list[str], engine_kind: str, loss: torch.Tensor, accelerator: int | None) -> None:
        if engine_kind == "accelerate":
            # Accelerate's DeepSpeed wrapper runs engine.backward and engine.step together;
            # the optimizer/scheduler wrappers' step() are then no-ops.
            self.accelerators[accelerator].backward(loss)
        else:
            # One backward through the shared loss reaches every engine's ZeRO hooks; the
            # engine scales the loss by its gradient-accumulation steps (equal for all).
            self.models[models[0]].engine.backward(loss)

    def step(self, models: list[str], engine_kind: str) -> None:
        for name in models:
            handle = self.models[name]
            if engine_kind == "accelerate":
                handle.optimizer.step()
                if handle.scheduler is not None:
                    handle.scheduler.step()
                handle.optimizer.zero_grad()
            else:
                handle.engine.step()       # steps and zeroes at the accumulation boundary only

    def learning_rate(self, name: str) -> float:
        engine = self.models[name].engine
        return float(engine.get_lr()[0]) if engine.optimizer is not None else 0.0

    def is_boundary(self, name: str) -> bool:
        return self.models[name].engine.is_gradient_accumulation_boundary()

    # -- collectives, export, checkpoints --------------------------------------------------

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        world = torch.distributed.get_world_size()
        torch.distributed.all_reduce(values)           # a sync point: once per logged step
        return values / world

    def barrier(self) -> None:
        torch.distributed.barrier()

    def full_state_dict(self, name: str) -> dict[str, torch.Tensor] | None:
        """The full weights on rank 0 (gathered from the ZeRO-3 shards), None elsewhere."""
        module = self.models[name].engine.module
        rank = torch.distributed.get_rank()
        params = list(module.parameters())
        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None) \
            if self.models[name].stage == 3 else contextlib.nullcontext()
        with context:
            if rank != 0:
                return None
            return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}

    def local_shard_numels(self, name: str) -> tuple[int, int]:
        """(elements held by this rank, elements of the whole model) of the parameters."""
        local = total = 0
        for p in self.models[name].engine.module.parameters():
            if hasattr(p, "ds_tensor"):
                local += p.ds_tensor.numel()
                total += p.ds_numel
            else:
                local += p.numel()
                total += p.numel()
        return local, total

    def save_checkpoint(self, name: str, directory: str, tag: str) -> None:
        # Each engine its own folder; DeepSpeed's `latest` pointer is not used (the manifest is).
        self.models[name].engine.save_checkpoint(directory, tag=tag, save_latest=False)

    def load_checkpoint(self, name: str, directory: str, tag: str) -> None:
        """Unpickles DeepSpeed's files: only called for folders a valid dsgraph manifest names."""
        path, _ = self.models[name].engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint of `{name}` in {directory}/{tag}")

    def shutdown(self) -> None:
        for accelerator in self.accelerators.values():
            accelerator.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _quiet_stdout():
    return contextlib.redirect_stdout(open(os.devnull, "w"))


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return type(value)({k: _cast(v, dtype) for k, v in value.items()}) if type(value) is dict else \
            value.__class__(**{k: _cast(v, dtype) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value
