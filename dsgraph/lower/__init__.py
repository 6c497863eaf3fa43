"""The lowering stage, AST -> IR: names resolved, values typed, defaults filled.

`pipeline.lower` is the stage; `settings`, `sources`, `models` and `losses` lower what their names
say; `values` turns AST values into Python values and binds arguments to built-ins (ZeRO
declarations, lowered by `dsgraph.dsconfig.zero`, use it too)."""
