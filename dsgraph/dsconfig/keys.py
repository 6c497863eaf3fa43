"""The DeepSpeed configuration keys dsgraph knows, read off DeepSpeed 0.19.8's config classes.

DeepSpeed silently ignores a misspelled top-level key; dsgraph reports it (DSG408) with a
did-you-mean. Nothing here imports deepspeed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dsgraph.plan import Fill

TOP_LEVEL = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "optimizer",
        "scheduler",
        "fp16",
        "bf16",
        "bfloat16",
        "amp",
        "torch_autocast",
        "gradient_clipping",
        "prescale_gradients",
        "gradient_predivide_factor",
        "sparse_gradients",
        "zero_optimization",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
        "steps_per_print",
        "wall_clock_breakdown",
        "memory_breakdown",
        "dump_state",
        "flops_profiler",
        "activation_checkpointing",
        "communication_data_type",
        "seq_parallel_communication_data_type",
        "data_types",
        "checkpoint",
        "aio",
        "tensorboard",
        "wandb",
        "csv_monitor",
        "comet",
        "monitor_config",
        "comms_logger",
        "compression_training",
        "elasticity",
        "autotuning",
        "data_efficiency",
        "curriculum_learning",
        "pipeline",
        "sparse_attention",
        "nebula",
        "compile",
        "timers",
        "disable_allgather",
        "load_universal_checkpoint",
        "use_node_local_storage",
        "hybrid_engine",
        "eigenvalue",
        "progressive_layer_drop",
        "quantize_training",
        "weight_quantization",
        "dataloader_drop_last",
        "graph_harvesting",
        "zero_optimization_stage",
        "tensor_parallel",
        "use_data_before_expert_parallelism",
        "gradient_accumulation_dtype",
    }
)

ZERO = frozenset(
    {
        "stage",
        "allgather_bucket_size",
        "allgather_partitions",
        "compute_grad_norm",
        "contiguous_gradients",
        "cpu_offload",
        "cpu_offload_param",
        "cpu_offload_use_pin_memory",
        "elastic_checkpoint",
        "enable_sanity_checks",
        "ignore_unused_parameters",
        "leaf_module",
        "legacy_stage1",
        "load_from_fp32_weights",
        "log_trace_cache_warnings",
        "memory_efficient_linear",
        "offload_optimizer",
        "offload_param",
        "overlap_comm",
        "override_module_apply",
        "parameter_alignment",
        "pipeline_loading_checkpoint",
        "reduce_bucket_size",
        "reduce_scatter",
        "round_robin_gradients",
        "save_muon_momentum_buffer_in_memory",
        "stage3_allgather_sequential",
        "stage3_gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
        "stage3_model_persistence_threshold",
        "stage3_module_granularity_threshold",
        "stage3_param_persistence_threshold",
        "stage3_prefetch_bucket_size",
        "stage3_use_all_reduce_for_fetch_params",
        "sub_group_size",
        "use_multi_rank_bucket_allreduce",
        "zenflow",
        "zero_hpz_partition_size",
        "zero_quantized_gradients",
        "zero_quantized_nontrainable_weights",
        "zero_quantized_weights",
        "mics_shard_size",
        "mics_hierarchical_params_gather",
    }
)

OFFLOAD_PARAM = frozenset({"device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "pin_memory"})
OFFLOAD_OPTIMIZER = frozenset(
    {
        "device",
        "nvme_path",
        "buffer_count",
        "pin_memory",
        "pipeline_read",
        "pipeline_write",
        "fast_init",
        "ratio",
        "cpuadam_cores_perc",
        "super_offload",
    }
)

# Keys whose value type dsgraph checks (DSG411): "auto" is accepted for the scalar ones (dsgraph
# fills it, or reports DSG412), never for an object.
INT = "int"
NUM = "number"
BOOL = "bool"
OBJ = "object"
TYPE_WORDS = {INT: "a whole number", NUM: "a number", BOOL: "true or false", OBJ: "an object (a block `{ ... }`)"}
TYPES = {
    "zero_optimization": OBJ,
    "optimizer": OBJ,
    "optimizer.params": OBJ,
    "scheduler": OBJ,
    "scheduler.params": OBJ,
    "fp16": OBJ,
    "bf16": OBJ,
    "zero_optimization.offload_param": OBJ,
    "zero_optimization.offload_optimizer": OBJ,
    "train_batch_size": INT,
    "train_micro_batch_size_per_gpu": INT,
    "gradient_accumulation_steps": INT,
    "gradient_clipping": NUM,
    "steps_per_print": INT,
    "wall_clock_breakdown": BOOL,
    "prescale_gradients": BOOL,
    "zero_optimization.stage": INT,
    "zero_optimization.reduce_bucket_size": NUM,
    "zero_optimization.allgather_bucket_size": NUM,
    "zero_optimization.overlap_comm": BOOL,
    "zero_optimization.contiguous_gradients": BOOL,
    "zero_optimization.reduce_scatter": BOOL,
    "zero_optimization.stage3_prefetch_bucket_size": NUM,
    "zero_optimization.stage3_param_persistence_threshold": NUM,
    "zero_optimization.stage3_max_live_parameters": NUM,
    "zero_optimization.stage3_max_reuse_distance": NUM,
    "zero_optimization.sub_group_size": NUM,
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": BOOL,
}

# Keys DeepSpeed also takes as null (its config classes declare them Optional).
NULLABLE = frozenset({"zero_optimization.offload_param", "zero_optimization.offload_optimizer"})

# "auto" values the run fills from the model itself (Accelerate's rules, hidden-size based).
RUNTIME_AUTO = frozenset(
    {
        Fill.REDUCE_BUCKET_SIZE,
        Fill.ALLGATHER_BUCKET_SIZE,
        Fill.PREFETCH_BUCKET_SIZE,
        Fill.PARAM_PERSISTENCE_THRESHOLD,
        Fill.MAX_LIVE_PARAMETERS,
        Fill.MAX_REUSE_DISTANCE,
    }
)


def zero_stage(config: Mapping[str, Any]) -> int | None:
    """The ZeRO stage a DeepSpeed config sets: 0 when it sets none, None when it is "auto" (which
    nothing fills: DSG412). Lowering has dropped a stage of the wrong type or out of range."""
    zero = config.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    return None if stage == "auto" else int(stage)


def known_children(path: str) -> frozenset[str] | None:
    """The keys allowed inside the object at `path`, or None when dsgraph does not check them."""
    return {
        "": TOP_LEVEL,
        "zero_optimization": ZERO,
        "zero_optimization.offload_param": OFFLOAD_PARAM,
        "zero_optimization.offload_optimizer": OFFLOAD_OPTIMIZER,
    }.get(path)
