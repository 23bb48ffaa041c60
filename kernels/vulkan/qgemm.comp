#version 450
#extension GL_GOOGLE_include_directive : require
// Integer GEMM, portable variant (no integer dot product instructions); see qgemm.glsl.
#include "qgemm.glsl"
