// Shared by every edgehal Vulkan kernel.
//
// Binding 0 holds the parameters of every dispatch of a compiled subgraph as one uint array;
// the push constant says where this dispatch's parameters start. Data bindings (1..) are whole
// buffers; element offsets into them are parameters. Parameter slots are documented per
// kernel and mirrored in drivers/vulkan/src/plan.rs.
layout(std430, set = 0, binding = 0) readonly buffer Params { uint prm[]; };
layout(push_constant) uniform Push { uint base; } pc;

uint P(uint i) { return prm[pc.base + i]; }
int PI(uint i) { return int(prm[pc.base + i]); }
float PF(uint i) { return uintBitsToFloat(prm[pc.base + i]); }

// Activations fused into kernel epilogues (the same codes as plan.rs `Act`).
#define ACT_NONE 0u
#define ACT_RELU 1u
#define ACT_CLIP 2u
#define ACT_HARDSWISH 3u
#define ACT_SIGMOID 4u
#define ACT_LEAKYRELU 5u
#define ACT_TANH 6u
#define ACT_HARDSIGMOID 7u

float act(float v, uint kind, float a, float b) {
    switch (kind) {
    case ACT_RELU: return max(v, 0.0);
    case ACT_CLIP: return min(max(v, a), b);
    case ACT_HARDSWISH: return v * clamp(v / 6.0 + 0.5, 0.0, 1.0);
    case ACT_SIGMOID: return 1.0 / (1.0 + exp(-v));
    case ACT_LEAKYRELU: return v < 0.0 ? v * a : v;
    case ACT_TANH: return tanh(v);
    case ACT_HARDSIGMOID: return clamp(a * v + b, 0.0, 1.0);
    default: return v;
    }
}
