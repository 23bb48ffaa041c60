// Integer GEMM for MatMulInteger / QLinearMatMul: y[m, n] = sum_k (a[m,k] - za) (b[k,n] - zb),
// exact in int32, then (QLinearMatMul) requantized: clamp(roundEven(acc * mul) + zy, lo, hi).
// A comes from the float arena (quantized values are integers held exactly in float32) and is
// packed four 8-bit lanes to a word here; B is a constant packed on the host column by column,
// K padded to a multiple of 4 with zeros. With DOT defined, four lanes multiply-add in one
// OpSDot/OpUDot/OpSUDot (VK_KHR_shader_integer_dot_product); without, bitfieldExtract and
// 32-bit multiplies (the fallback for devices without shaderIntegerDotProduct).
//
// Zero points are applied after the raw products (a and b keep their own signedness, which the
// packed formats need): sum (a-za)(b-zb) = sum ab - zb sum a - za sum b + K za zb.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, set = 0, binding = 1) readonly buffer A_ { float a[]; };
layout(std430, set = 0, binding = 2) readonly buffer B_ { uint b[]; };
layout(std430, set = 0, binding = 3) writeonly buffer Y_ { float y[]; };

// 0 total outputs, 1 N (columns: B's columns / output channels), 2 K, 3 words per column
// (ceil(K/4)), 4 a_off, 5 b_off (words), 6 y_off, 7 za, 8 zb_off (N ints in b[]), 9 a signed,
// 10 b signed, 11 mode (0 int32 out, 1 requantize), 12 mul_off (N floats in b[]), 13 zy,
// 14 lo, 15 hi, 16 bias_off (N ints in b[]; 0xffffffff: none), 17 conv (0 GEMM, 1 NCHW conv),
// conv geometry: 18 Cin, 19 H, 20 W, 21 Cout, 22 OH, 23 OW, 24 groups, 25 kh, 26 kw,
// 27 sh, 28 sw, 29 ph, 30 pw, 31 dh, 32 dw
// GEMM: output i = row * N + col, A row-major [rows, K]. Conv: output i is NCHW, column =
// output channel, K runs over (input channel of the group, ky, kx); padding reads za.

#ifdef DOT
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4450)
int sdot(uint x, uint w, spirv_literal int fmt);
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4451)
uint udot(uint x, uint w, spirv_literal int fmt);
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4452)
int sudot(uint x, uint w, spirv_literal int fmt);

// Dot product of four 8-bit lanes, each operand signed or not.
int dot4(uint x, bool xs, uint w, bool ws) {
    if (xs && ws) return sdot(x, w, 0);
    if (!xs && !ws) return int(udot(x, w, 0));
    if (xs) return sudot(x, w, 0);
    return sudot(w, x, 0);
}
#else
int lane(uint x, int i, bool s) {
    return s ? bitfieldExtract(int(x), 8 * i, 8) : int(bitfieldExtract(x, 8 * i, 8));
}

int dot4(uint x, bool xs, uint w, bool ws) {
    int r = 0;
    for (int i = 0; i < 4; i++) {
        r += lane(x, i, xs) * lane(w, i, ws);
    }
    return r;
}
#endif

// Element kk of the A row for output i (GEMM: abase + kk; conv: im2col on the fly).
int a_at(uint i, uint abase, uint kk) {
    if (P(17u) == 0u) {
        return int(a[abase + kk]);
    }
    uint cin = P(18u), h = P(19u), w = P(20u), cout = P(21u), oh = P(22u), ow = P(23u);
    uint kh = P(25u), kwid = P(26u);
    uint ox = i % ow, oy = (i / ow) % oh, co = (i / (ow * oh)) % cout, nb = i / (ow * oh * cout);
    uint cg = cin / P(24u);
    uint gi = co / (cout / P(24u));
    uint cil = kk / (kh * kwid), r = kk % (kh * kwid);
    uint ky = r / kwid, kx = r % kwid;
    int iy = int(oy * P(27u) + ky * P(31u)) - int(P(29u));
    int ix = int(ox * P(28u) + kx * P(32u)) - int(P(30u));
    if (iy < 0 || ix < 0 || iy >= int(h) || ix >= int(w)) {
        return PI(7u);
    }
    uint ci = gi * cg + cil;
    return int(a[P(4u) + ((nb * cin + ci) * h + uint(iy)) * w + uint(ix)]);
}

void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (i >= P(0u)) {
        return;
    }
    uint n = P(1u), k = P(2u), kw = P(3u);
    bool conv = P(17u) != 0u;
    uint col = conv ? (i / (P(22u) * P(23u))) % P(21u) : i % n;
    uint abase = conv ? 0u : P(4u) + (i / n) * k;
    uint bbase = P(5u) + col * kw;
    bool as_ = P(9u) != 0u, bs = P(10u) != 0u;
    const uint ones = 0x01010101u;
    int acc = 0, suma = 0, sumb = 0;
    for (uint w = 0u; w < kw; w++) {
        uint pa = 0u;
        for (uint l = 0u; l < 4u; l++) {
            uint kk = w * 4u + l;
            int v = kk < k ? a_at(i, abase, kk) : 0;
            pa |= (uint(v) & 0xffu) << (8u * l);
        }
        uint pb = b[bbase + w];
        acc += dot4(pa, as_, pb, bs);
        suma += dot4(pa, as_, ones, true);
        sumb += dot4(pb, bs, ones, true);
    }
    int za = PI(7u), zb = int(b[P(8u) + col]);
    acc += -zb * suma - za * sumb + int(k) * za * zb;
    if (P(16u) != 0xffffffffu) {
        acc += int(b[P(16u) + col]);
    }
    float r;
    if (P(11u) == 1u) {
        float mul = uintBitsToFloat(b[P(12u) + col]);
        r = clamp(roundEven(float(acc) * mul) + float(PI(13u)), float(PI(14u)), float(PI(15u)));
    } else {
        r = float(acc);
    }
    y[P(6u) + i] = r;
}
