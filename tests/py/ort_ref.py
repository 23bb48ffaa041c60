#!/usr/bin/env python3
"""Reference outputs from onnxruntime for one model on seeded inputs.
Usage: ort_ref.py MODEL OUTDIR [SEED]
Writes OUTDIR/input_K.npy (seeded: floats uniform[-1,1), ints [0,100)) and OUTDIR/output_K.npy."""
import os, sys
import numpy as np
import onnxruntime as ort

model, out = sys.argv[1], sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 7
os.makedirs(out, exist_ok=True)
ort.set_default_logger_severity(3)
so = ort.SessionOptions()
so.intra_op_num_threads = 1
s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
rs = np.random.RandomState(seed)
tmap = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32}
feed = {}
for k, i in enumerate(s.get_inputs()):
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    t = tmap[i.type]
    x = rs.uniform(-1, 1, size=shape).astype(t) if np.dtype(t).kind == "f" else rs.randint(0, 100, size=shape).astype(t)
    feed[i.name] = x
    np.save(os.path.join(out, f"input_{k}.npy"), x)
for k, y in enumerate(s.run(None, feed)):
    np.save(os.path.join(out, f"output_{k}.npy"), y)
print("ok", len(feed), "inputs")
