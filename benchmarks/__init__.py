"""hgrn_cupy's benchmark suite, run as ``python -m benchmarks --out DIR [--quick]`` from the repo root
(benchmarks/README.md says what each table and column means).

Layout, one idea per module: ``cli`` (arguments, the run), ``plan`` (shapes, sections, skip rules;
pure Python, so --dry-run needs no torch), ``context`` (run-wide state), ``timing`` (timers, rotation,
CUDA graphs, host time), ``checks`` (the reference and the checks before timing), ``sections`` (the
pass tables), ``hoststep``, ``decode``, ``impls/`` (one module per implementation family, JAX
included), ``precompile`` and ``extbuild`` (the peers' compiles in child processes), ``report``,
``output`` and ``plots`` (tables, files, figures).  Importing the package imports neither torch nor
any peer."""
