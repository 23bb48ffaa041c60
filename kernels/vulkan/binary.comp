#version 450
#extension GL_GOOGLE_include_directive : require
// Elementwise binary op with numpy broadcasting (rank <= 6, broadcast axes have stride 0) and
// a fused activation.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, set = 0, binding = 1) readonly buffer A_ { float a[]; };
layout(std430, set = 0, binding = 2) readonly buffer B_ { float b[]; };
layout(std430, set = 0, binding = 3) writeonly buffer C_ { float c[]; };

// 0 total, 1 op, 2 act, 3 act_a, 4 act_b, 5 a_off, 6 b_off, 7 c_off, 8 rank, 9 contiguous
// (both inputs have the output's shape), 10..15 shape, 16..21 a strides, 22..27 b strides
void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (i >= P(0u)) {
        return;
    }
    uint ai = i, bi = i;
    if (P(9u) == 0u) {
        ai = 0u;
        bi = 0u;
        uint t = i;
        uint rank = P(8u);
        for (uint d = rank; d > 0u; d--) {
            uint dim = P(10u + d - 1u);
            uint co = t % dim;
            t /= dim;
            ai += co * P(16u + d - 1u);
            bi += co * P(22u + d - 1u);
        }
    }
    float x = a[P(5u) + ai];
    float y = b[P(6u) + bi];
    float r;
    switch (P(1u)) {
    case 0u: r = x + y; break;
    case 1u: r = x - y; break;
    case 2u: r = x * y; break;
    case 3u: r = x / y; break;
    case 4u: r = max(x, y); break;
    case 5u: r = min(x, y); break;
    case 6u: r = pow(x, y); break;
    default: r = x < 0.0 ? x * y : x; break; // PRelu
    }
    c[P(7u) + i] = act(r, P(2u), PF(3u), PF(4u));
}
