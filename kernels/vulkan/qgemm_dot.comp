#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_spirv_intrinsics : require
// Integer GEMM with packed 4x8-bit dot products (needs shaderIntegerDotProduct); see
// qgemm.glsl.
#define DOT
#include "qgemm.glsl"
