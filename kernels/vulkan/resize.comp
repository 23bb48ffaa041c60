#version 450
#extension GL_GOOGLE_include_directive : require
// Resize, any rank <= 6: each output coordinate is mapped back to an input coordinate by the
// coordinate transformation mode, then rounded by the nearest mode (mode 0) or interpolated
// linearly between its two neighbours on every axis (mode 1: bilinear, trilinear...; indices
// outside the input are clamped to its edge, as ONNX's reference pads with edge values).
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, set = 0, binding = 1) readonly buffer X_ { float x[]; };
layout(std430, set = 0, binding = 2) writeonly buffer Y_ { float y[]; };

// 0 total, 1 rank, 2 x_off, 3 y_off, 4 coordinate mode (0 half_pixel, 1 asymmetric,
// 2 align_corners, 3 pytorch_half_pixel, 4 tf_half_pixel_for_nn, 5 half_pixel_symmetric), 5 nearest mode
// (0 round_prefer_floor, 1 round_prefer_ceil, 2 floor, 3 ceil), 6..11 in shape,
// 12..17 out shape, 18..23 scales (float), 24 mode (0 nearest, 1 linear)
// out_len is the integer output length (align_corners and pytorch_half_pixel divide by it, as
// onnxruntime does; ONNX's reference uses in_len * scale, which differs when that is not an
// integer); half_pixel_symmetric uses both, as specified.
float src_coord(float o, float scale, float in_len, float out_len, uint mode) {
    float out_f = in_len * scale;
    switch (mode) {
    case 1u: return o / scale;
    case 2u: return out_len > 1.0 ? o * (in_len - 1.0) / (out_len - 1.0) : 0.0;
    case 3u: return out_len > 1.0 ? (o + 0.5) / scale - 0.5 : 0.0;
    case 4u: return (o + 0.5) / scale;
    case 5u: return in_len / 2.0 * (1.0 - out_len / out_f) + (o + 0.5) / scale - 0.5;
    default: return (o + 0.5) / scale - 0.5;
    }
}

int nearest(float v, uint mode) {
    switch (mode) {
    case 1u: return int(fract(v) == 0.5 ? ceil(v) : round(v));
    case 2u: return int(floor(v));
    case 3u: return int(ceil(v));
    default: return int(fract(v) == 0.5 ? floor(v) : round(v));
    }
}

void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (i >= P(0u)) {
        return;
    }
    uint rank = P(1u);
    if (P(24u) == 1u) {
        // Per axis: lower neighbour, its weight's complement, and the input stride.
        int lo[6];
        float fr[6];
        uint st[6];
        uint t = i;
        uint stride = 1u;
        for (uint d = rank; d > 0u; d--) {
            uint od = P(12u + d - 1u);
            uint id = P(6u + d - 1u);
            uint co = t % od;
            t /= od;
            float s = src_coord(float(co), PF(18u + d - 1u), float(id), float(od), P(4u));
            float fl = floor(s);
            lo[d - 1u] = int(fl);
            fr[d - 1u] = s - fl;
            st[d - 1u] = stride;
            stride *= id;
        }
        float acc = 0.0;
        for (uint c = 0u; c < (1u << rank); c++) {
            float w = 1.0;
            uint xi = 0u;
            for (uint d = 0u; d < rank; d++) {
                uint hi = (c >> d) & 1u;
                float wd = hi == 1u ? fr[d] : 1.0 - fr[d];
                w *= wd;
                int idx = clamp(lo[d] + int(hi), 0, int(P(6u + d)) - 1);
                xi += uint(idx) * st[d];
            }
            if (w != 0.0) {
                acc += w * x[P(2u) + xi];
            }
        }
        y[P(3u) + i] = acc;
        return;
    }
    uint t = i;
    uint xi = 0u;
    uint stride = 1u;
    for (uint d = rank; d > 0u; d--) {
        uint od = P(12u + d - 1u);
        uint id = P(6u + d - 1u);
        uint co = t % od;
        t /= od;
        float s = src_coord(float(co), PF(18u + d - 1u), float(id), float(od), P(4u));
        int c = clamp(nearest(s, P(5u)), 0, int(id) - 1);
        xi += uint(c) * stride;
        stride *= id;
    }
    y[P(3u) + i] = x[P(2u) + xi];
}
