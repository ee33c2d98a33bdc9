"""The math of the weight-side PTQ algorithms (GPTQ, AWQ, NF4), on plain tensors.

Nothing here knows about graphs: the passes in `qcompile.passes` gather a layer's inputs, call
these functions, and write the result back. So each algorithm can be tested alone, on a layer.

A `spec` here is anything with the attributes `qmin`, `qmax`, `symmetric`, `granularity` and
`observer` of a `qcompile.QuantSpec` (benchmarks pass 3-bit grids that no recipe offers).
"""
