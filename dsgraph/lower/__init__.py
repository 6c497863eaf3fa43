"""The lowering stage, AST -> IR: names resolved, values typed, defaults filled.

`pipeline` lowers the file's pipeline; `values` turns AST values into Python values and binds
arguments to built-ins; `losses` lowers loss expressions. ZeRO declarations are lowered by
`dsgraph.dsconfig.zero`, which knows DeepSpeed's keys."""

from dsgraph.lower.pipeline import lower

__all__ = ["lower"]
