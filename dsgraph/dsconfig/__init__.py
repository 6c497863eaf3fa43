"""What dsgraph knows of DeepSpeed configs, in one place: the keys DeepSpeed takes (`keys`), `zero`
declarations as DeepSpeed configs (`zero`, used while lowering), each model's resolved config with
its problems (`resolve`), `zero = auto` (`auto`) and the memory estimate (`estimate`, `sizes`).
What only the run can know is marked in the plan (`plan.Fill`) and filled by the runtime's
`dsgraph.runtime.configs.complete`."""
