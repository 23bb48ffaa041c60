#version 450
#extension GL_GOOGLE_include_directive : require
// Softmax / LogSoftmax over the middle axis of an [outer, len, inner] view: one invocation per
// (outer, inner) row, max-subtracted.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, set = 0, binding = 1) readonly buffer X_ { float x[]; };
layout(std430, set = 0, binding = 2) writeonly buffer Y_ { float y[]; };

// 0 rows (outer*inner), 1 len, 2 inner, 3 x_off, 4 y_off, 5 log
void main() {
    uint r = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (r >= P(0u)) {
        return;
    }
    uint len = P(1u), inner = P(2u);
    uint o = r / inner;
    uint in_ = r - o * inner;
    uint base = o * len * inner + in_;
    uint xo = P(3u) + base, yo = P(4u) + base;
    float m = -3.402823466e38;
    for (uint k = 0u; k < len; k++) {
        m = max(m, x[xo + k * inner]);
    }
    float s = 0.0;
    for (uint k = 0u; k < len; k++) {
        s += exp(x[xo + k * inner] - m);
    }
    bool lg = P(5u) != 0u;
    float ls = log(s);
    for (uint k = 0u; k < len; k++) {
        float v = x[xo + k * inner] - m;
        y[yo + k * inner] = lg ? v - ls : exp(v) / s;
    }
}
