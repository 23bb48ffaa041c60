#version 450
#extension GL_GOOGLE_include_directive : require
// MaxPool / AveragePool / GlobalAveragePool / GlobalMaxPool over NCHW planes: one invocation
// per output element.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, set = 0, binding = 1) readonly buffer X_ { float x[]; };
layout(std430, set = 0, binding = 2) writeonly buffer Y_ { float y[]; };

// 0 total, 1 x_off, 2 y_off, 3 H, 4 W, 5 OH, 6 OW, 7 KH, 8 KW, 9 SH, 10 SW, 11 PH, 12 PW,
// 13 DH, 14 DW, 15 mode (0 max, 1 average excluding pads, 2 average including pads)
void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (i >= P(0u)) {
        return;
    }
    uint H = P(3u), W = P(4u), OH = P(5u), OW = P(6u), KH = P(7u), KW = P(8u);
    uint ow = i % OW;
    uint t = i / OW;
    uint oh = t % OH;
    uint plane = t / OH;
    uint xb = P(1u) + plane * H * W;
    int ih0 = int(oh * P(9u)) - PI(11u);
    int iw0 = int(ow * P(10u)) - PI(12u);
    int dh = PI(13u), dw = PI(14u);
    uint mode = P(15u);
    float m = -3.402823466e38;
    float s = 0.0;
    uint cnt = 0u;
    uint cnt_pad = 0u;
    for (uint kh = 0u; kh < KH; kh++) {
        int ih = ih0 + int(kh) * dh;
        for (uint kw = 0u; kw < KW; kw++) {
            int iw = iw0 + int(kw) * dw;
            // Positions inside the padded input count for count_include_pad.
            if (ih < int(H) + PI(11u) && iw < int(W) + PI(12u)) {
                cnt_pad++;
            }
            if (ih < 0 || ih >= int(H) || iw < 0 || iw >= int(W)) {
                continue;
            }
            float v = x[xb + uint(ih) * W + uint(iw)];
            m = max(m, v);
            s += v;
            cnt++;
        }
    }
    float r;
    if (mode == 0u) {
        r = m;
    } else if (mode == 1u) {
        r = cnt > 0u ? s / float(cnt) : 0.0;
    } else {
        r = cnt_pad > 0u ? s / float(cnt_pad) : 0.0;
    }
    y[P(2u) + i] = r;
}
