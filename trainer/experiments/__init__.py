"""Experiments on top of the run: the sweep runner, the benchmarks (``bench train|expedite|select|
growth``) and the growth search. Nothing below this package imports it."""
