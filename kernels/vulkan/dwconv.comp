#version 450
#extension GL_GOOGLE_include_directive : require
// Convolution with one input channel per group (depthwise, any channel multiplier), NCHW:
// one invocation per output element, bias and activation fused.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, set = 0, binding = 1) readonly buffer X_ { float x[]; };
layout(std430, set = 0, binding = 2) readonly buffer W_ { float w[]; };
layout(std430, set = 0, binding = 3) readonly buffer Bias_ { float bias[]; };
layout(std430, set = 0, binding = 4) writeonly buffer Y_ { float y[]; };

// 0 total, 1 x_off, 2 w_off, 3 bias_off, 4 y_off, 5 has_bias, 6 C_out, 7 mult (C_out/groups),
// 8 H, 9 W, 10 KH, 11 KW, 12 SH, 13 SW, 14 PH, 15 PW, 16 DH, 17 DW, 18 OH, 19 OW,
// 20 act, 21 act_a, 22 act_b, 23 C_in
void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (i >= P(0u)) {
        return;
    }
    uint OW = P(19u), OH = P(18u), COUT = P(6u);
    uint ow = i % OW;
    uint t = i / OW;
    uint oh = t % OH;
    t /= OH;
    uint co = t % COUT;
    uint bi = t / COUT;
    uint ci = co / P(7u);
    uint H = P(8u), W = P(9u), KH = P(10u), KW = P(11u);
    uint xb = P(1u) + (bi * P(23u) + ci) * H * W;
    uint wb = P(2u) + co * KH * KW;
    int ih0 = int(oh * P(12u)) - PI(14u);
    int iw0 = int(ow * P(13u)) - PI(15u);
    int dh = PI(16u), dw = PI(17u);
    float s = 0.0;
    for (uint kh = 0u; kh < KH; kh++) {
        int ih = ih0 + int(kh) * dh;
        if (ih < 0 || ih >= int(H)) {
            continue;
        }
        for (uint kw = 0u; kw < KW; kw++) {
            int iw = iw0 + int(kw) * dw;
            if (iw < 0 || iw >= int(W)) {
                continue;
            }
            s = fma(x[xb + uint(ih) * W + uint(iw)], w[wb + kh * KW + kw], s);
        }
    }
    if (P(5u) != 0u) {
        s += bias[P(3u) + co];
    }
    y[P(4u) + i] = act(s, P(20u), PF(21u), PF(22u));
}
