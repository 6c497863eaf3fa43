"""The runtime: executes a compiled Plan on DeepSpeed engines and Accelerators.

Reads only the Plan's JSON form; never imports Lark or the compiler's front end."""
