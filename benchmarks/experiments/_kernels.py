"""What experiments do to kernels: the library's kernel sources compiled with lines replaced, the split of
L1 and shared memory a kernel asks for, and an experiment's own kernels compiled (NVRTC alone, for CI)
and launched on torch's stream.  Table scripts pass the settings these return to ``_common.run``."""
from __future__ import annotations

import sys

# An experiment kernel's inputs by dtype: (C++ type of the library's kernels, itemsize).
ELEMENT = {"bfloat16": ("hc::bfloat16_t", 2), "float32": ("float", 4)}


def patched_kernels(nvrtc, sources, replacements, who):
    """Settings under which the library's kernel ``sources`` (file names, as an engine's SOURCE) compile
    with ``replacements`` applied ((old, new, how many times old is in each source)), in NVRTC caches of
    their own (kept with the settings, so a variant compiles once).  Exits, naming ``who``, where a line
    is not there as often as expected: the kernels moved on and the variant no longer means anything."""
    texts = dict(nvrtc._sources)
    for source in sources:
        text = nvrtc.read_source(source)
        for old, new, count in replacements:
            if text.count(old) != count:
                sys.exit(f"{who}: {old!r} is in {source} {text.count(old)} times, not {count}")
            text = text.replace(old, new)
        texts[source] = text
    return [(nvrtc, "_sources", texts), (nvrtc, "_modules", {}), (nvrtc, "_functions", {})]


def carved(nvrtc, percent):
    """Settings under which the library's kernels are loaded anew (NVRTC caches of their own) and every
    kernel that asks for a shared-memory split (``nvrtc.prefer_shared``) asks for ``percent`` instead (None:
    none, the driver's own choice)."""
    prefer_shared = nvrtc.prefer_shared

    def prefer(fn, _percent):
        if percent is not None:
            prefer_shared(fn, percent)
    return [(nvrtc, "_modules", {}), (nvrtc, "_functions", {}), (nvrtc, "prefer_shared", prefer)]


def after_library(name, path):
    """The library's kernel file ``name`` (its includes folded in by ``nvrtc.read_source``), then the
    experiment's kernels at ``path``: one text, as NVRTC compiles it."""
    from hgrn_cupy import nvrtc

    return nvrtc.read_source(name) + "\n" + path.read_text()


def compile_only(text, filename, names, options):
    """An experiment's own kernels through NVRTC for sm_90 (no GPU): every name expression of ``names``
    in ``text``; prints the log or a count, exits non-zero on failure."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(text, filename, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, ["--gpu-architecture=sm_90", *options])
        except nvrtc.NVRTCError as e:
            sys.exit(f"NVRTC failed: {e}\n{nvrtc.getProgramLog(prog)}")
        print(nvrtc.getProgramLog(prog).strip() or f"{len(names)} kernels compiled for sm_90")
    finally:
        nvrtc.destroyProgram(prog)


def raw_launch(torch, fn, grid, block, args, shared=0):
    """A raw CuPy kernel ``fn(*args)`` queued on torch's current stream: tensors pass their pointers, the
    rest as given (NumPy scalars of the kernel's parameter types)."""
    import cupy
    import numpy as np

    values = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        fn(grid, block, values, shared_mem=shared)


def raw_forward(torch, fn, grid, block, x, g, scalars, shared=0):
    """``o``: a raw CuPy kernel ``fn(x, g, o, *scalars)`` queued on torch's current stream, o fresh."""
    o = torch.empty_like(x)
    raw_launch(torch, fn, grid, block, (x, g, o) + tuple(scalars), shared)
    return o


def own_kernel_script(doc, title, cases, smoke_case, note, variants, launcher, who, kernels, groups=None):
    """The main of an experiment with kernels of its own.  ``kernels``: ``(source(), names(), NVRTC options,
    file name)``, the text and name expressions of every instantiation built lazily.  With
    ``--compile-only`` they go through NVRTC alone (no GPU; what CI runs); else ``own_kernel_table`` times
    them (arguments as there)."""
    source, names, options, filename = kernels
    if "--compile-only" in sys.argv:
        return compile_only(source(), filename, names(), options)

    def module():
        import cupy

        return cupy.RawModule(code=source(), options=options, name_expressions=names())
    own_kernel_table(doc, title, cases, smoke_case, note, variants, module, launcher, who, groups)


def own_kernel_table(doc, title, cases, smoke_case, note, variants, module, launcher, who, groups=None):
    """The forward table of an experiment's own kernels: columns the chunk engine and ``hgrn()``, then the
    variants the command line names (``--variants``; else those of ``--group``, a name of ``groups``, the
    first by default; else all of ``variants``), each timed through ``launcher(torch, module(), name) ->
    fwd(set)`` and checked against the chunk engine (but a variant named "... (bound)", which computes
    something else by design)."""
    import _common as c

    torch = c.torch_cuda()

    def extra(p):
        p.add_argument("--variants", type=lambda t: [v for v in t.split(",") if v], default=None,
                       help=f"comma-separated, of: {', '.join(variants)}")
    args, timer, gbps, hc = c.start(doc, title, None if groups else cases, smoke_case, note,
                                    groups={g: (cases,) for g in groups} if groups else None, passes="fwd",
                                    extra=extra)
    if args.variants is None:
        args.variants = list(groups[args.group]) if groups else list(variants)
    unknown = [v for v in args.variants if v not in variants]
    if unknown:
        sys.exit(f"{who}: unknown variants {unknown}; known: {list(variants)}")
    loaded = module()
    columns = {"chunk (as shipped)": [], "hgrn()": []}
    calls = {"chunk (as shipped)": c.engine_calls(hc, "chunk"), "hgrn()": c.engine_calls(hc, "auto")}
    for name in args.variants:
        columns[name], calls[name] = [], {"fwd": launcher(torch, loaded, name)}
    c.run(args, timer, gbps, columns, calls, lambda: None, unchecked=[n for n in columns if n.endswith("(bound)")])
