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

// 0 total (M*N), 1 N, 2 K, 3 words per column (ceil(K/4)), 4 a_off, 5 b_off (words),
// 6 y_off, 7 za, 8 zb (ints), 9 a signed, 10 b signed, 11 mode (0 int32 out, 1 requantize),
// 12 mul (float), 13 zy, 14 lo, 15 hi (ints)

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

void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (i >= P(0u)) {
        return;
    }
    uint n = P(1u), k = P(2u), kw = P(3u);
    uint row = i / n, col = i % n;
    uint abase = P(4u) + row * k;
    uint bbase = P(5u) + col * kw;
    bool as_ = P(9u) != 0u, bs = P(10u) != 0u;
    const uint ones = 0x01010101u;
    int acc = 0, suma = 0, sumb = 0;
    for (uint w = 0u; w < kw; w++) {
        uint pa = 0u;
        for (uint l = 0u; l < 4u; l++) {
            uint kk = w * 4u + l;
            int v = kk < k ? int(a[abase + kk]) : 0;
            pa |= (uint(v) & 0xffu) << (8u * l);
        }
        uint pb = b[bbase + w];
        acc += dot4(pa, as_, pb, bs);
        suma += dot4(pa, as_, ones, true);
        sumb += dot4(pb, bs, ones, true);
    }
    int za = PI(7u), zb = PI(8u);
    acc += -zb * suma - za * sumb + int(k) * za * zb;
    float r;
    if (P(11u) == 1u) {
        r = clamp(roundEven(float(acc) * PF(12u)) + float(PI(13u)), float(PI(14u)), float(PI(15u)));
    } else {
        r = float(acc);
    }
    y[P(6u) + i] = r;
}
