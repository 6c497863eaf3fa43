"""Every DeepSpeed and Accelerate call dsgraph makes, in one place.

`Backend` holds the Accelerators and engines of one rank and offers the operations the executor
dispatches the plan's steps to: create/select/prepare (Accelerate), initialize (native DeepSpeed),
the accumulation context, forward, backward and the optimizer step, and around them gathering,
checkpoints, unwrapping for export and the memory measurement."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsgraph.runtime.env import without_module

# DeepSpeed's autotuner imports mlflow when it is installed, only to log autotuning runs, which
# dsgraph never starts: 1.6 s of every worker's start on these CPUs. Hidden from that import
# alone (the MLflow tracker imports it for real when a pipeline asks for it).
with without_module("mlflow"):
    import deepspeed  # (DS_ACCELERATOR is set by the launcher before this import)
from deepspeed.accelerator import get_accelerator
from dsgraph.plan import Precision
from dsgraph.runtime import measure

logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
deepspeed.utils.logger.setLevel(logging.ERROR)

MEASURED_STEP = 2  # ZeRO-3 creates Adam's state in the first step: the second sees it all
_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


@dataclass
class ModelHandle:
    name: str
    engine: Any  # a DeepSpeedEngine (what Accelerate's prepare returns too)
    accelerator: int | None  # the Accelerator that prepared it; None: deepspeed.initialize
    precision: Precision
    trained: bool
    optimizer: Any = None  # Accelerate's optimizer wrapper, when prepared by Accelerate
    scheduler: Any = None
    memory: dict[str, int] | None = None  # measured as its MEASURED_STEP-th optimizer step began
    watched: bool = False  # its step is (or was) wrapped for that measurement


@dataclass
class Backend:
    on_cpu: bool = field(default_factory=lambda: get_accelerator().device_name() == "cpu")
    accelerators: dict[int, Any] = field(default_factory=dict)
    models: dict[str, ModelHandle] = field(default_factory=dict)
    calls: list[tuple[str, str | None]] = field(default_factory=list)  # as executed, for the tests
    _plugin_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    _hf_configs: list[Any] = field(default_factory=list)

    # -- process group ---------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return "gloo" if self.on_cpu else str(get_accelerator().communication_backend_name())

    def init_distributed(self) -> None:
        self.calls.append(("init_process_group", None))
        with _quiet_stdout():
            deepspeed.init_distributed(dist_backend=self.backend_name)

    def check_world(self, rank: int, world: int) -> None:
        """Every layer must agree on who this process is (Accelerate on CPU can silently fall back
        to one process while DeepSpeed runs with several)."""
        seen = {
            "launcher": (rank, world),
            "torch.distributed": (torch.distributed.get_rank(), torch.distributed.get_world_size()),
            "deepspeed": (deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()),
        }
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

    def create_accelerator(self, index: int, plugins: dict[str, dict[str, Any]], mixed_precision: str | None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        self.calls.append(("create_accelerator", None))
        if index == 0:
            # The plugins live in the shared AcceleratorState; the first one is the default.
            # gloo must be named on CPU, or Accelerate silently runs single-process.
            self._plugin_configs = plugins
            with _quiet_stdout():  # DeepSpeed prints a line when it loads its comm op
                accelerator = Accelerator(
                    deepspeed_plugins={name: DeepSpeedPlugin(hf_ds_config=cfg) for name, cfg in plugins.items()},
                    mixed_precision=mixed_precision,
                    kwargs_handlers=[InitProcessGroupKwargs(backend=self.backend_name)],
                )
        else:
            accelerator = Accelerator()  # one trained engine per Accelerator
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if accelerator.num_processes != world:
            raise RuntimeError(f"Accelerate sees {accelerator.num_processes} processes, the launcher {world}")
        self.accelerators[index] = accelerator

    def select_plugin(self, name: str) -> None:
        # Transformers' zero.Init and the next prepare() follow the selected plugin.
        self.accelerators[0].state.select_deepspeed_plugin(name)
        self.calls.append(("select_plugin", name))

    def prepare(
        self,
        name: str,
        accelerator: int,
        model: nn.Module,
        objects: tuple[str, ...],
        precision: Precision,
        client_optimizer: Any = None,
    ) -> None:
        from accelerate.utils import DummyOptim, DummyScheduler

        self.calls.append(("prepare", name))
        acc = self.accelerators[accelerator]
        if "optimizer" not in objects:
            model.requires_grad_(False)
            engine = acc.prepare(model)
            engine.eval()
            self.models[name] = ModelHandle(name, engine, accelerator, precision, False)
            return
        # The optimizer and scheduler are built by DeepSpeed from the config; Accelerate takes
        # placeholders for them. A client optimizer is handed over as it is (no "optimizer" block).
        optimizer = client_optimizer or DummyOptim([p for p in model.parameters() if p.requires_grad])
        placeholders = [optimizer, DummyScheduler(optimizer)] if "scheduler" in objects else [optimizer]
        engine, *prepared = acc.prepare(model, *placeholders)
        engine.train()
        self.models[name] = ModelHandle(
            name, engine, accelerator, precision, True, prepared[0], prepared[1] if len(prepared) > 1 else None
        )

    # -- native engines --------------------------------------------------------------------

    def initialize(
        self,
        name: str,
        model: nn.Module,
        config: dict[str, Any],
        objects: tuple[str, ...],
        precision: Precision,
        client_optimizer: Any = None,
    ) -> None:
        self.calls.append(("initialize", name))
        if "optimizer" not in objects:
            model.requires_grad_(False)
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
        elif client_optimizer is not None:  # DeepSpeed wraps it; the scheduler still from the config
            engine, *_ = deepspeed.initialize(model=model, optimizer=client_optimizer, config=config)
            engine.train()
        else:  # the optimizer (and scheduler) from the config
            engine, *_ = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
            )
            engine.train()
        self.models[name] = ModelHandle(name, engine, None, precision, "optimizer" in objects)

    # -- building --------------------------------------------------------------------------

    def build_context(
        self, name: str, config: dict[str, Any], zero_init: bool, is_hf: bool
    ) -> contextlib.AbstractContextManager[Any]:
        """ZeRO-3 models are partitioned as they are built. Transformers does it itself when a
        DeepSpeed config is active (Accelerate's selected plugin, or an HfDeepSpeedConfig)."""
        self.calls.append(("build_model", name))
        if not zero_init:  # built whole (`zero_init = false` at ZeRO-3: prepare partitions it)
            return _without_transformers_zero3() if is_hf else contextlib.nullcontext()
        if is_hf:
            if not self.accelerators:
                from transformers.integrations import HfDeepSpeedConfig

                self._hf_configs.append(HfDeepSpeedConfig(config))  # must stay alive while building
            return contextlib.nullcontext()
        return deepspeed.zero.Init(config_dict_or_path=config)

    # -- the training step -----------------------------------------------------------------

    def accumulate(self) -> contextlib.ExitStack:
        """One micro step: Accelerate decides the accumulation boundary (`sync_gradients`) inside
        `accumulate()`; native engines count micro steps themselves."""
        stack = contextlib.ExitStack()
        for handle in self.models.values():
            if handle.trained and handle.accelerator is not None:
                stack.enter_context(self.accelerators[handle.accelerator].accumulate(handle.engine))
        return stack

    def forward(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        handle = self.models[name]
        dtype = _DTYPES.get(handle.precision)
        if dtype is not None:  # per-model precision: inputs in the model's dtype ...
            args = [_cast(a, dtype) for a in args]
            kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        out = handle.engine(*args, **kwargs)  # ZeRO-3: gathers each layer's parameters on the fly
        return _cast(out, torch.float32) if dtype is not None else out  # ... outputs back to fp32

    def gathering(self, name: str, gather_once: bool) -> str:
        """How a generation from the model holds its weights: "unpartitioned" (ZeRO-0 to 2),
        "once" (ZeRO-3, gathered for the whole generation) or "layers" (ZeRO-3, per forward)."""
        engine = self.models[name].engine
        if engine.zero_optimization_stage() != 3:
            return "unpartitioned"
        # The ZeRO-3 hooks live on the engine's optimizer (DeepSpeedZeRoOffload for a frozen model).
        return "once" if gather_once and engine.optimizer is not None else "layers"

    @contextlib.contextmanager
    def generating(self, name: str, gather_once: bool) -> Iterator[nn.Module]:
        """The model's module for sampling: eval mode and no_grad, train mode again after (a
        trained model). At ZeRO-3, `gather_once` gathers every parameter once for the whole
        generation and takes DeepSpeed's per-layer hooks off until it ends (DeepSpeed's own
        `unwrap_model_for_generation`; the copy costs the model's full size on each rank);
        otherwise each forward gathers each layer again, for every new token."""
        handle = self.models[name]
        engine, module = handle.engine, handle.engine.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                if self.gathering(name, gather_once) == "once":
                    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

                    with unwrap_model_for_generation(engine):  # one all-gather of every parameter
                        yield module
                else:
                    yield module
        finally:
            module.train(was_training)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on some rank: a collective every rank calls at the same point."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device())
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)  # a sync point
        return bool(value.item())

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """An evaluation: every engine in eval mode (no dropout) and no autograd graph; the
        trained engines back in train mode after."""
        trained = [h.engine for h in self.models.values() if h.trained]
        for engine in trained:
            engine.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for engine in trained:
                engine.train()

    def backward(self, models: tuple[str, ...], loss: torch.Tensor) -> None:
        first = self.models[models[0]]
        if first.accelerator is not None:
            # Accelerate's DeepSpeed wrapper runs engine.backward and, at the accumulation
            # boundary, engine.step (clipping, optimizer, scheduler, zero_grad) together.
            self.accelerators[first.accelerator].backward(loss)
        else:
            # One backward through the shared loss reaches every engine's ZeRO hooks; the engine
            # scales the loss by its gradient-accumulation steps (equal for all).
            first.engine.backward(loss)

    def optimizer_step(self, models: tuple[str, ...]) -> None:
        for name in models:
            handle = self.models[name]
            if handle.accelerator is not None:
                # The loop of an Accelerate script; under DeepSpeed these wrappers do nothing
                # (the engine stepped in accelerator.backward).
                handle.optimizer.step()
                if handle.scheduler is not None:
                    handle.scheduler.step()
                handle.optimizer.zero_grad()
            else:
                handle.engine.step()  # steps and zeroes at the accumulation boundary only

    def learning_rate(self, name: str) -> float:
        engine = self.models[name].engine
        return float(engine.get_lr()[0]) if engine.optimizer is not None else 0.0

    # -- the memory measurement ------------------------------------------------------------

    def watch_memory(self) -> None:
        """Measure each trained engine once, as its MEASURED_STEP-th optimizer step begins (the
        step's gradients are reduced, the optimizer states exist); then put the engine's own
        `step` back, so that no later step pays for it. The instance's `step` is wrapped, which
        Accelerate's backward calls too. Once per run: a later call (a benchmark training in
        chunks) changes nothing."""
        for handle in self.models.values():
            if not handle.trained or handle.watched:
                continue
            handle.watched = True
            engine, step, seen = handle.engine, handle.engine.step, [0]

            def measured_step(
                *args: Any, _handle: ModelHandle = handle, _step: Any = step, _seen: list[int] = seen, **kwargs: Any
            ) -> Any:
                if _handle.engine.is_gradient_accumulation_boundary():
                    _seen[0] += 1
                    if _seen[0] == MEASURED_STEP:
                        _handle.memory = measure.measure(_handle.engine)  # walks every tensor: once
                        if torch.cuda.is_available():  # all of this rank's tensors, every model's
                            _handle.memory["cuda_allocated"] = torch.cuda.memory_allocated()
                        _handle.engine.step = _step
                return _step(*args, **kwargs)

            engine.step = measured_step

    def release(self, name: str) -> None:
        """A frozen model's engine destroyed (its ZeRO-3 hooks removed) and every reference to it
        dropped, the Accelerator's included, so that its parameters are freed."""
        import gc

        self.calls.append(("release", name))
        handle = self.models.pop(name)
        engine = handle.engine
        for accelerator in self.accelerators.values():  # prepare() kept the engine, and wrapped its
            # ZeRO-3 parameter offload (the `optimizer` of a frozen engine) as an optimizer
            accelerator._models = [m for m in accelerator._models if m is not engine]
            accelerator._optimizers = [
                o for o in accelerator._optimizers if getattr(o, "optimizer", None) is not engine.optimizer
            ]
        module = handle.engine.module
        handle.engine.destroy()
        # DeepSpeed 0.19's ZeRO-3 keeps every engine's top module on a module-level stack it never
        # pops (parameter_offload.FWD_MODULE_STACK): without this, the model outlives its engine.
        from deepspeed.runtime.zero import parameter_offload

        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not module]
        _clear_release_cache()
        engine.module = None
        del handle, engine, module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Every model's bytes: a trained one's as measured at its step, a frozen one's now."""
        return {name: h.memory or measure.measure(h.engine) for name, h in self.models.items()}

    # -- collectives, export, checkpoints --------------------------------------------------

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        world = torch.distributed.get_world_size()
        torch.distributed.all_reduce(values)  # a sync point: once per logged step
        return values / world

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(values)  # a sync point: once per evaluation
        return values

    def all_gather_object(self, value: Any, world: int) -> list[Any]:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        torch.distributed.barrier()

    def module(self, name: str) -> nn.Module:
        """The model itself, out of its engine (its parameters are partitioned under ZeRO-3)."""
        module: nn.Module = self.models[name].engine.module
        return module

    def full_state_dict(self, name: str) -> dict[str, torch.Tensor] | None:
        """The full weights on rank 0 (gathered from the ZeRO-3 shards), None elsewhere. A
        collective: every rank must call it."""
        module = self.module(name)
        rank = torch.distributed.get_rank()
        params = list(module.parameters())
        partitioned = any(hasattr(p, "ds_tensor") for p in params)
        context = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None) if partitioned else contextlib.nullcontext()
        )
        with context:
            if rank != 0:
                return None
            return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}

    def local_shard_numels(self, name: str) -> tuple[int, int]:
        """(elements held by this rank, elements of the whole model) of the parameters."""
        local = total = 0
        for p in self.module(name).parameters():
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
        engine = self.models[name].engine
        four_bit = any(getattr(p, "quant_state", None) is not None for p in engine.module.parameters())
        path, _ = engine.load_checkpoint(
            directory,
            tag=tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=_load_without_quant_states if four_bit else None,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint of `{name}` in {directory}/{tag}")

    def shutdown(self) -> None:
        for accelerator in self.accelerators.values():
            accelerator.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _clear_release_cache() -> None:
    """DeepSpeed 0.19's ZeRO-3 parameter coordinator memoizes which parameters to release per
    (coordinator, submodule) in a class-wide lru_cache, which holds every module it has seen. A
    cache only: emptied, the other engines' coordinators fill it again on their next forward."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    function = vars(PartitionedParameterCoordinator).get("_PartitionedParameterCoordinator__params_to_release")
    for _ in range(4):  # through the decorators around it (DeepSpeed's instrument_w_nvtx)
        if function is None or hasattr(function, "cache_clear"):
            break
        inner = [c.cell_contents for c in getattr(function, "__closure__", None) or () if callable(c.cell_contents)]
        function = getattr(function, "__wrapped__", None) or (inner[0] if inner else None)
    if function is not None and hasattr(function, "cache_clear"):
        function.cache_clear()


def _load_without_quant_states(src: dict[str, Any], dst: nn.Module) -> None:
    """A 4-bit model's saved state, strictly, but for its weights' quantization constants
    (`...weight.absmax`, `...weight.quant_map`, ...): bitsandbytes saves them beside each packed
    weight, but they are neither parameters nor buffers, so a module cannot load them; the model
    has them already, from the base it was loaded from, which training does not change."""
    owners = tuple(f"{name}." for name, p in dst.named_parameters() if getattr(p, "quant_state", None) is not None)
    dst.load_state_dict({k: v for k, v in src.items() if not k.startswith(owners)}, strict=True)


@contextlib.contextmanager
def _without_transformers_zero3() -> Iterator[None]:
    """Transformers builds a model under zero.Init whenever a ZeRO-3 config is registered with it
    (the selected plugin's, or another model's): hide it while a model is built whole."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _quiet_stdout() -> contextlib.redirect_stdout[Any]:
    return contextlib.redirect_stdout(open(os.devnull, "w"))


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return (
            type(value)({k: _cast(v, dtype) for k, v in value.items()})
            if type(value) is dict
            else value.__class__(**{k: _cast(v, dtype) for k, v in value.items()})
        )
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value
