#version 450
#extension GL_GOOGLE_include_directive : require
// Strided copy of a rank <= 6 box: Transpose, Concat, Slice, Pad (after a fill), Expand and
// Reshape/Flatten when a real copy is needed. Source strides may be 0 (broadcast) or negative
// (reversed slices).
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, set = 0, binding = 1) readonly buffer X_ { float x[]; };
layout(std430, set = 0, binding = 2) writeonly buffer Y_ { float y[]; };

// 0 total, 1 rank, 2 x_off, 3 y_off, 4..9 shape, 10..15 x strides (int), 16..21 y strides
void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (i >= P(0u)) {
        return;
    }
    int xi = PI(2u);
    int yi = PI(3u);
    uint t = i;
    for (uint d = P(1u); d > 0u; d--) {
        uint dim = P(4u + d - 1u);
        uint co = t % dim;
        t /= dim;
        xi += int(co) * PI(10u + d - 1u);
        yi += int(co) * PI(16u + d - 1u);
    }
    y[uint(yi)] = x[uint(xi)];
}
