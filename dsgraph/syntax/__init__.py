"""Parsing: the Lark grammar in grammars/dsgraph.lark, to a typed AST with spans."""
