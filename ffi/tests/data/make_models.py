"""Regenerate the tiny models the C API tests use (run with the repo's .venv python).

shrink.onnx:     y = Shrink(x; bias=1, lambd=0.5), x and y float32[2,3]
shrink_dyn.onnx: the same with x and y float32[N,3] (symbolic batch)
matmul.onnx:     y = MatMul(x, W), x float32[2,3], W constant [3,2] (zero-copy output test)
Shrink maps x > 0.5 to x - 1, x < -0.5 to x + 1, everything else to 0.
"""
import os

import onnx
from onnx import TensorProto, helper

here = os.path.dirname(os.path.abspath(__file__))


def shrink(path, dims):
    n = helper.make_node("Shrink", ["x"], ["y"], bias=1.0, lambd=0.5)
    g = helper.make_graph(
        [n],
        "shrink",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgehal-ffi-tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, os.path.join(here, path))


shrink("shrink.onnx", [2, 3])
shrink("shrink_dyn.onnx", ["N", 3])


def standin_classifier(path):
    """A stand-in for MobileNetV2's interface built from ops already on main: input
    float32[1,3,224,224] -> CenterCropPad to [1,3,2,5] = 30 "class scores" (the centre pixels of
    each channel). Lets the classify examples run end to end before Conv/Gemm land."""
    shape = helper.make_tensor("crop", TensorProto.INT64, [2], [2, 5])
    n = helper.make_node("CenterCropPad", ["input", "crop"], ["output"], axes=[2, 3])
    g = helper.make_graph(
        [n],
        "standin_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 2, 5])],
        initializer=[shape],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgehal-ffi-tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, os.path.join(here, path))


standin_classifier("standin_classifier.onnx")


def matmul(path):
    """y = MatMul(x, W): x float32[2,3], W = [[1,2],[3,4],[5,6]] (initializer), y float32[2,2].
    The final op writes straight into a bound output buffer (the zero-copy output test)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1, 2, 3, 4, 5, 6])
    n = helper.make_node("MatMul", ["x", "w"], ["y"])
    g = helper.make_graph(
        [n],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        initializer=[w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgehal-ffi-tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, os.path.join(here, path))


matmul("matmul.onnx")
