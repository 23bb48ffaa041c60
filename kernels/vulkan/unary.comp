#version 450
#extension GL_GOOGLE_include_directive : require
// Elementwise unary ops: the fused activations (codes 0-7 of common.glsl) and a few more.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, set = 0, binding = 1) readonly buffer X_ { float x[]; };
layout(std430, set = 0, binding = 2) writeonly buffer Y_ { float y[]; };

// 0 total, 1 op, 2 a, 3 b, 4 x_off, 5 y_off, (quantize ops only) 6 lo, 7 hi
// op: 0-7 activations (0 = copy), 8 exp, 9 neg, 10 abs, 11 sqrt, 12 log, 13 reciprocal,
// 14 floor, 15 ceil, 16 elu(a),
// 17 quantize: clamp(roundEven(x / a) + b, lo, hi) (the integer, held in float32),
// 18 dequantize: (x - b) * a, 19 quantize then dequantize with the same a, b, lo, hi.
float quantize(float v, float s, float zp) {
    return clamp(roundEven(v / s) + zp, PF(6u), PF(7u));
}

void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (i >= P(0u)) {
        return;
    }
    float v = x[P(4u) + i];
    uint op = P(1u);
    float a = PF(2u), b = PF(3u);
    float r;
    switch (op) {
    case 8u: r = exp(v); break;
    case 9u: r = -v; break;
    case 10u: r = abs(v); break;
    case 11u: r = sqrt(v); break;
    case 12u: r = log(v); break;
    case 13u: r = 1.0 / v; break;
    case 14u: r = floor(v); break;
    case 15u: r = ceil(v); break;
    case 16u: r = v < 0.0 ? a * (exp(v) - 1.0) : v; break;
    case 17u: r = quantize(v, a, b); break;
    case 18u: r = (v - b) * a; break;
    case 19u: r = (quantize(v, a, b) - b) * a; break;
    default: r = act(v, op, a, b); break;
    }
    y[P(5u) + i] = r;
}
