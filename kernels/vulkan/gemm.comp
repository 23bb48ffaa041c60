#version 450
#extension GL_GOOGLE_include_directive : require
// Tiled GEMM C[z] = act(alpha * A[z] x B[z] + beta * bias), with B either a strided matrix
// (MODE 0: MatMul, Gemm, 1x1 convolution) or the implicit im2col of an NCHW input (MODE 1:
// general convolution with groups, strides, pads and dilation; z is the group).
// Each workgroup computes a (WG_Y*RM) x (WG_X*RN) tile; WG_X/WG_Y are specialization
// constants chosen per device.
#include "common.glsl"

layout(local_size_x_id = 0, local_size_y_id = 1) in;
layout(constant_id = 0) const uint WG_X = 16;
layout(constant_id = 1) const uint WG_Y = 16;
layout(constant_id = 2) const uint MODE = 0;
const uint RM = 4;
const uint RN = 4;
const uint TK = 16;
const uint BM = WG_Y * RM;
const uint BN = WG_X * RN;

layout(std430, set = 0, binding = 1) readonly buffer A_ { float a[]; };
layout(std430, set = 0, binding = 2) readonly buffer B_ { float b[]; };
layout(std430, set = 0, binding = 3) readonly buffer Bias_ { float bias[]; };
layout(std430, set = 0, binding = 4) writeonly buffer C_ { float c[]; };

shared float As[TK * BM];
shared float Bs[TK * BN];

// Parameter slots.
#define M_ 0u
#define N_ 1u
#define K_ 2u
#define A_OFF 3u
#define A_SM 4u
#define A_SK 5u
#define A_SB 6u
#define B_OFF 7u
#define B_SK 8u
#define B_SN 9u
#define B_SB 10u
#define C_OFF 11u
#define C_SM 12u
#define C_SN 13u
#define C_SB 14u
#define BIAS_OFF 15u
#define BIAS_SM 16u
#define BIAS_SN 17u
#define BIAS_SB 18u
#define HAS_BIAS 19u
#define ALPHA 20u
#define BETA 21u
#define ACT 22u
#define ACT_A 23u
#define ACT_B 24u
// MODE 1 (convolution) only.
#define CV_CIN_G 25u
#define CV_H 26u
#define CV_W 27u
#define CV_KH 28u
#define CV_KW 29u
#define CV_SH 30u
#define CV_SW 31u
#define CV_PH 32u
#define CV_PW 33u
#define CV_DH 34u
#define CV_DW 35u
#define CV_OH 36u
#define CV_OW 37u
#define CV_CIN 38u
#define CV_COUT 39u

float load_b(uint k, uint n, uint z) {
    if (MODE == 0u) {
        return b[P(B_OFF) + z * P(B_SB) + k * P(B_SK) + n * P(B_SN)];
    }
    uint khw = P(CV_KH) * P(CV_KW);
    uint ci = k / khw;
    uint r = k - ci * khw;
    uint kh = r / P(CV_KW);
    uint kw = r - kh * P(CV_KW);
    uint ohw = P(CV_OH) * P(CV_OW);
    uint bi = n / ohw;
    uint p = n - bi * ohw;
    uint oh = p / P(CV_OW);
    uint ow = p - oh * P(CV_OW);
    int ih = int(oh * P(CV_SH) + kh * P(CV_DH)) - PI(CV_PH);
    int iw = int(ow * P(CV_SW) + kw * P(CV_DW)) - PI(CV_PW);
    if (ih < 0 || iw < 0 || ih >= PI(CV_H) || iw >= PI(CV_W)) {
        return 0.0;
    }
    uint ch = bi * P(CV_CIN) + z * P(CV_CIN_G) + ci;
    return b[P(B_OFF) + (ch * P(CV_H) + uint(ih)) * P(CV_W) + uint(iw)];
}

void main() {
    uint M = P(M_), N = P(N_), K = P(K_);
    uint z = gl_WorkGroupID.z;
    uint m0 = gl_WorkGroupID.y * BM;
    uint n0 = gl_WorkGroupID.x * BN;
    uint tx = gl_LocalInvocationID.x;
    uint ty = gl_LocalInvocationID.y;
    uint tid = ty * WG_X + tx;
    uint nthreads = WG_X * WG_Y;
    uint a_base = P(A_OFF) + z * P(A_SB);
    uint a_sm = P(A_SM), a_sk = P(A_SK);

    float acc[RM][RN];
    for (uint i = 0u; i < RM; i++) {
        for (uint j = 0u; j < RN; j++) {
            acc[i][j] = 0.0;
        }
    }
    for (uint k0 = 0u; k0 < K; k0 += TK) {
        for (uint idx = tid; idx < BM * TK; idx += nthreads) {
            uint mm = idx / TK;
            uint kk = idx - mm * TK;
            uint m = m0 + mm;
            uint k = k0 + kk;
            As[kk * BM + mm] = (m < M && k < K) ? a[a_base + m * a_sm + k * a_sk] : 0.0;
        }
        for (uint idx = tid; idx < BN * TK; idx += nthreads) {
            uint kk = idx / BN;
            uint nn = idx - kk * BN;
            uint n = n0 + nn;
            uint k = k0 + kk;
            Bs[kk * BN + nn] = (n < N && k < K) ? load_b(k, n, z) : 0.0;
        }
        barrier();
        for (uint kk = 0u; kk < TK; kk++) {
            float av[RM];
            float bv[RN];
            for (uint i = 0u; i < RM; i++) {
                av[i] = As[kk * BM + ty + i * WG_Y];
            }
            for (uint j = 0u; j < RN; j++) {
                bv[j] = Bs[kk * BN + tx + j * WG_X];
            }
            for (uint i = 0u; i < RM; i++) {
                for (uint j = 0u; j < RN; j++) {
                    acc[i][j] = fma(av[i], bv[j], acc[i][j]);
                }
            }
        }
        barrier();
    }

    float alpha = PF(ALPHA), beta = PF(BETA);
    bool has_bias = P(HAS_BIAS) != 0u;
    uint kind = P(ACT);
    float act_a = PF(ACT_A), act_b = PF(ACT_B);
    for (uint i = 0u; i < RM; i++) {
        uint m = m0 + ty + i * WG_Y;
        if (m >= M) {
            continue;
        }
        for (uint j = 0u; j < RN; j++) {
            uint n = n0 + tx + j * WG_X;
            if (n >= N) {
                continue;
            }
            float v = alpha * acc[i][j];
            if (has_bias) {
                v += beta * bias[P(BIAS_OFF) + z * P(BIAS_SB) + m * P(BIAS_SM) + n * P(BIAS_SN)];
            }
            v = act(v, kind, act_a, act_b);
            uint ci;
            if (MODE == 0u) {
                ci = P(C_OFF) + z * P(C_SB) + m * P(C_SM) + n * P(C_SN);
            } else {
                uint ohw = P(CV_OH) * P(CV_OW);
                uint bi = n / ohw;
                uint p = n - bi * ohw;
                ci = P(C_OFF) + (bi * P(CV_COUT) + z * M + m) * ohw + p;
            }
            c[ci] = v;
        }
    }
}
