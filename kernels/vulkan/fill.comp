#version 450
#extension GL_GOOGLE_include_directive : require
// Fill a range with one value (Pad's constant, ConstantOfShape-like outputs).
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, set = 0, binding = 1) writeonly buffer Y_ { float y[]; };

// 0 total, 1 y_off, 2 value
void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * WG;
    if (i >= P(0u)) {
        return;
    }
    y[P(1u) + i] = PF(2u);
}
