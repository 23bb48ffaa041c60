#!/usr/bin/env python3
"""Reference outputs from LiteRT (ai-edge-litert) for one .tflite model on seeded inputs.

Usage: litert_ref.py MODEL OUTDIR [SEED] [--resolver ref|builtin|auto] [--tensors NAME,NAME...]

Writes OUTDIR/input_K.npy (seeded: floats uniform[-1,1), int8/uint8 over their whole range,
other ints [0,100)) and OUTDIR/output_K.npy, in the interpreter's input/output order.
The default resolver is LiteRT's reference kernels (BUILTIN_REF), whose integer rounding edgehal
reproduces; `builtin` the optimized kernels without delegates (same integer requantization for
conv/FC); `auto` adds the XNNPACK delegate. `--tensors` also saves the named intermediate tensors
as OUTDIR/tensor_K.npy (the interpreter keeps all tensors for this).
"""
import os
import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

argv = sys.argv[1:]
opts = {}
args = []
while argv:
    a = argv.pop(0)
    if a.startswith("--"):
        opts[a[2:]] = argv.pop(0) if argv else ""
    else:
        args.append(a)
model, out = args[0], args[1]
seed = int(args[2]) if len(args) > 2 else 7
kinds = {
    "ref": OpResolverType.BUILTIN_REF,
    "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    "auto": OpResolverType.AUTO,
}
kind = kinds[opts.get("resolver", "ref")]
os.makedirs(out, exist_ok=True)
wanted = [t for t in opts.get("tensors", "").split(",") if t]
it = Interpreter(
    model_path=model,
    experimental_op_resolver_type=kind,
    experimental_preserve_all_tensors=bool(wanted),
)
it.allocate_tensors()
rs = np.random.RandomState(seed)
for k, det in enumerate(it.get_input_details()):
    t = det["dtype"]
    shape = [int(d) for d in det["shape"]]
    if np.dtype(t).kind == "f":
        x = rs.uniform(-1, 1, size=shape).astype(t)
    elif t in (np.int8, np.uint8):
        info = np.iinfo(t)
        x = rs.randint(info.min, info.max + 1, size=shape).astype(t)
    else:
        x = rs.randint(0, 100, size=shape).astype(t)
    it.set_tensor(det["index"], x)
    np.save(os.path.join(out, f"input_{k}.npy"), x)
it.invoke()
for k, det in enumerate(it.get_output_details()):
    np.save(os.path.join(out, f"output_{k}.npy"), it.get_tensor(det["index"]))
by_name = {d["name"]: d["index"] for d in it.get_tensor_details()}
for k, name in enumerate(wanted):
    np.save(os.path.join(out, f"tensor_{k}.npy"), it.get_tensor(by_name[name]))
print("ok", len(it.get_input_details()), "inputs")
