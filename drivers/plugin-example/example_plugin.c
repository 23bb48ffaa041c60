/*
 * Example edgehal plugin: one device, "example0", running Relu, Add and Mul on float32.
 * Add and Mul take equal-sized operands or a one-element operand (scalar broadcast).
 *
 * Build: cc -shared -fPIC -Iinclude -o libedgehal_example.so example_plugin.c
 * Test-only switches: -DEXAMPLE_ABI_VERSION=N reports another ABI version;
 * -DEXAMPLE_OMIT_ENTRY leaves out the entry point; -DEXAMPLE_ADD_SKEW=X adds X to every Add
 * result (so a test can tell from a model's output that the plugin, not the CPU, ran its Adds).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgehal_plugin.h"

#ifndef EXAMPLE_ADD_SKEW
#define EXAMPLE_ADD_SKEW 0.0f
#endif

#ifndef EXAMPLE_ABI_VERSION
#define EXAMPLE_ABI_VERSION EDGEHAL_PLUGIN_ABI_VERSION
#endif

enum op_kind { OP_RELU, OP_ADD, OP_MUL };

typedef struct {
    enum op_kind kind;
    uint32_t in[2];
    uint32_t out;
} ex_op;

typedef struct {
    uint32_t n_values;
    uint32_t n_ops;
    ex_op *ops;
    uint32_t n_inputs;
    uint32_t *inputs;
    uint32_t n_outputs;
    uint32_t *outputs;
    /* constant data per value (NULL when not a constant), element counts */
    float **constants;
    uint64_t *const_len;
} ex_exe;

typedef struct {
    int opened;
    unsigned long submits;
} ex_device;

typedef struct {
    edgehal_status status;
    char msg[256];
} ex_fence;

typedef struct {
    edgehal_buffer_desc desc;
} ex_buffer;

static void set_err(char *err, size_t len, const char *msg) {
    if (err && len) {
        snprintf(err, len, "%s", msg);
    }
}

static int op_kind_of(const char *op, enum op_kind *k) {
    if (strcmp(op, "Relu") == 0) { *k = OP_RELU; return 1; }
    if (strcmp(op, "Add") == 0) { *k = OP_ADD; return 1; }
    if (strcmp(op, "Mul") == 0) { *k = OP_MUL; return 1; }
    return 0;
}

static uint32_t ex_device_count(void) { return 1; }

static const char *ex_device_name(uint32_t index) { return index == 0 ? "example0" : NULL; }

static edgehal_status ex_open(uint32_t index, void **device, char *err, size_t err_len) {
    if (index != 0) {
        set_err(err, err_len, "no such device");
        return EDGEHAL_ERR_INVALID;
    }
    ex_device *d = calloc(1, sizeof *d);
    if (!d) return EDGEHAL_ERR_NOMEM;
    d->opened = 1;
    *device = d;
    return EDGEHAL_OK;
}

static void ex_close(void *device) { free(device); }

static int32_t ex_supports(void *device, const char *op_type, uint32_t n_inputs,
                           const edgehal_tensor_desc *inputs, char *reason, size_t reason_len) {
    (void)device;
    enum op_kind k;
    if (!op_kind_of(op_type, &k)) {
        char msg[128];
        snprintf(msg, sizeof msg, "example plugin has no %s kernel", op_type);
        set_err(reason, reason_len, msg);
        return 0;
    }
    uint32_t want = k == OP_RELU ? 1 : 2;
    if (n_inputs != want) {
        set_err(reason, reason_len, "wrong number of inputs");
        return 0;
    }
    for (uint32_t i = 0; i < n_inputs; i++) {
        if (inputs[i].dtype != EDGEHAL_DTYPE_FLOAT && inputs[i].dtype != EDGEHAL_DTYPE_UNKNOWN) {
            set_err(reason, reason_len, "example plugin runs float32 only");
            return 0;
        }
    }
    return 1;
}

static uint64_t numel(const edgehal_tensor_desc *d) {
    uint64_t n = 1;
    for (uint32_t i = 0; i < d->rank && i < EDGEHAL_MAX_RANK; i++) n *= (uint64_t)d->dims[i];
    return n;
}

static void ex_release_executable(void *p) {
    ex_exe *e = p;
    if (!e) return;
    if (e->constants) {
        for (uint32_t i = 0; i < e->n_values; i++) free(e->constants[i]);
    }
    free(e->constants);
    free(e->const_len);
    free(e->ops);
    free(e->inputs);
    free(e->outputs);
    free(e);
}

static edgehal_status ex_compile(void *device, const edgehal_program *p, void **out, char *err,
                                 size_t err_len) {
    (void)device;
    ex_exe *e = calloc(1, sizeof *e);
    if (!e) return EDGEHAL_ERR_NOMEM;
    e->n_values = p->n_values;
    e->n_ops = p->n_ops;
    e->n_inputs = p->n_inputs;
    e->n_outputs = p->n_outputs;
    e->ops = calloc(p->n_ops ? p->n_ops : 1, sizeof *e->ops);
    e->inputs = calloc(p->n_inputs ? p->n_inputs : 1, sizeof(uint32_t));
    e->outputs = calloc(p->n_outputs ? p->n_outputs : 1, sizeof(uint32_t));
    e->constants = calloc(p->n_values ? p->n_values : 1, sizeof(float *));
    e->const_len = calloc(p->n_values ? p->n_values : 1, sizeof(uint64_t));
    if (!e->ops || !e->inputs || !e->outputs || !e->constants || !e->const_len) {
        ex_release_executable(e);
        return EDGEHAL_ERR_NOMEM;
    }
    for (uint32_t i = 0; i < p->n_ops; i++) {
        const edgehal_op *op = &p->ops[i];
        if (!op_kind_of(op->op_type, &e->ops[i].kind)) {
            char msg[128];
            snprintf(msg, sizeof msg, "op %u: no %s kernel", i, op->op_type);
            set_err(err, err_len, msg);
            ex_release_executable(e);
            return EDGEHAL_ERR_UNSUPPORTED;
        }
        uint32_t want = e->ops[i].kind == OP_RELU ? 1 : 2;
        if (op->n_inputs != want || op->n_outputs != 1) {
            set_err(err, err_len, "wrong number of inputs or outputs");
            ex_release_executable(e);
            return EDGEHAL_ERR_INVALID;
        }
        for (uint32_t k = 0; k < want; k++) {
            if (op->inputs[k] >= p->n_values) {
                set_err(err, err_len, "input value index out of range");
                ex_release_executable(e);
                return EDGEHAL_ERR_INVALID;
            }
            e->ops[i].in[k] = op->inputs[k];
        }
        if (op->outputs[0] >= p->n_values) {
            set_err(err, err_len, "output value index out of range");
            ex_release_executable(e);
            return EDGEHAL_ERR_INVALID;
        }
        e->ops[i].out = op->outputs[0];
    }
    for (uint32_t i = 0; i < p->n_inputs; i++) e->inputs[i] = p->inputs[i];
    for (uint32_t i = 0; i < p->n_outputs; i++) e->outputs[i] = p->outputs[i];
    for (uint32_t c = 0; c < p->n_constants; c++) {
        uint32_t v = p->constant_values[c];
        const edgehal_tensor *t = &p->constants[c];
        if (v >= p->n_values || t->desc.dtype != EDGEHAL_DTYPE_FLOAT || t->bytes % 4 != 0) {
            set_err(err, err_len, "constant is not a float32 tensor");
            ex_release_executable(e);
            return EDGEHAL_ERR_UNSUPPORTED;
        }
        e->constants[v] = malloc(t->bytes ? t->bytes : 1);
        if (!e->constants[v]) {
            ex_release_executable(e);
            return EDGEHAL_ERR_NOMEM;
        }
        memcpy(e->constants[v], t->data, t->bytes);
        e->const_len[v] = t->bytes / 4;
    }
    *out = e;
    return EDGEHAL_OK;
}

static edgehal_status run(ex_exe *e, const edgehal_tensor *inputs, uint32_t n_inputs,
                          const edgehal_tensor *outputs, uint32_t n_outputs, char *msg,
                          size_t msg_len) {
    if (n_inputs != e->n_inputs || n_outputs != e->n_outputs) {
        set_err(msg, msg_len, "wrong number of input or output tensors");
        return EDGEHAL_ERR_INVALID;
    }
    float **val = calloc(e->n_values ? e->n_values : 1, sizeof(float *));
    uint64_t *len = calloc(e->n_values ? e->n_values : 1, sizeof(uint64_t));
    unsigned char *owned = calloc(e->n_values ? e->n_values : 1, 1);
    edgehal_status st = EDGEHAL_OK;
    if (!val || !len || !owned) {
        st = EDGEHAL_ERR_NOMEM;
        goto out;
    }
    for (uint32_t v = 0; v < e->n_values; v++) {
        if (e->constants[v]) {
            val[v] = e->constants[v];
            len[v] = e->const_len[v];
        }
    }
    for (uint32_t i = 0; i < n_inputs; i++) {
        if (inputs[i].desc.dtype != EDGEHAL_DTYPE_FLOAT || inputs[i].bytes != numel(&inputs[i].desc) * 4) {
            set_err(msg, msg_len, "input is not a dense float32 tensor");
            st = EDGEHAL_ERR_INVALID;
            goto out;
        }
        val[e->inputs[i]] = inputs[i].data;
        len[e->inputs[i]] = inputs[i].bytes / 4;
    }
    for (uint32_t k = 0; k < e->n_ops; k++) {
        ex_op *op = &e->ops[k];
        float *a = val[op->in[0]];
        uint64_t na = len[op->in[0]];
        float *b = op->kind == OP_RELU ? NULL : val[op->in[1]];
        uint64_t nb = op->kind == OP_RELU ? 0 : len[op->in[1]];
        if (!a || (op->kind != OP_RELU && !b)) {
            set_err(msg, msg_len, "op input has no value");
            st = EDGEHAL_ERR_INVALID;
            goto out;
        }
        uint64_t n = na;
        if (op->kind != OP_RELU) {
            if (na != nb && na != 1 && nb != 1) {
                set_err(msg, msg_len, "Add/Mul operands must have equal sizes or one element");
                st = EDGEHAL_ERR_UNSUPPORTED;
                goto out;
            }
            n = na > nb ? na : nb;
        }
        /* Write straight into a bound output when this op produces one. */
        float *dst = NULL;
        for (uint32_t o = 0; o < n_outputs; o++) {
            if (e->outputs[o] == op->out) {
                if (outputs[o].bytes != n * 4) {
                    set_err(msg, msg_len, "output tensor has the wrong size");
                    st = EDGEHAL_ERR_INVALID;
                    goto out;
                }
                dst = outputs[o].data;
            }
        }
        if (!dst) {
            dst = malloc(n ? n * 4 : 4);
            if (!dst) {
                st = EDGEHAL_ERR_NOMEM;
                goto out;
            }
            owned[op->out] = 1;
        }
        for (uint64_t i = 0; i < n; i++) {
            float x = a[na == 1 ? 0 : i];
            switch (op->kind) {
            case OP_RELU: dst[i] = x > 0.0f ? x : 0.0f; break;
            case OP_ADD: dst[i] = x + b[nb == 1 ? 0 : i] + EXAMPLE_ADD_SKEW; break;
            case OP_MUL: dst[i] = x * b[nb == 1 ? 0 : i]; break;
            }
        }
        val[op->out] = dst;
        len[op->out] = n;
    }
    /* Outputs that are program inputs or constants are copied through. */
    for (uint32_t o = 0; o < n_outputs; o++) {
        uint32_t v = e->outputs[o];
        if (val[v] && val[v] != outputs[o].data) {
            if (outputs[o].bytes != len[v] * 4) {
                set_err(msg, msg_len, "output tensor has the wrong size");
                st = EDGEHAL_ERR_INVALID;
                goto out;
            }
            memcpy(outputs[o].data, val[v], outputs[o].bytes);
        }
    }
out:
    if (val && owned) {
        for (uint32_t v = 0; v < e->n_values; v++)
            if (owned[v]) free(val[v]);
    }
    free(val);
    free(len);
    free(owned);
    return st;
}

static edgehal_status ex_submit(void *device, void *executable, const edgehal_tensor *inputs,
                                uint32_t n_inputs, const edgehal_tensor *outputs,
                                uint32_t n_outputs, void **fence, char *err, size_t err_len) {
    ex_device *d = device;
    if (!d || !executable || !fence) {
        set_err(err, err_len, "null handle");
        return EDGEHAL_ERR_INVALID;
    }
    ex_fence *f = calloc(1, sizeof *f);
    if (!f) return EDGEHAL_ERR_NOMEM;
    d->submits++;
    /* This device is synchronous: the work is done before the fence is returned. */
    f->status = run(executable, inputs, n_inputs, outputs, n_outputs, f->msg, sizeof f->msg);
    *fence = f;
    return EDGEHAL_OK;
}

static edgehal_status ex_fence_wait(void *fence, int64_t timeout_ns, char *err, size_t err_len) {
    (void)timeout_ns;
    ex_fence *f = fence;
    if (!f) return EDGEHAL_ERR_INVALID;
    if (f->status != EDGEHAL_OK) set_err(err, err_len, f->msg);
    return f->status;
}

static void ex_release_fence(void *fence) { free(fence); }

static edgehal_status ex_import_buffer(void *device, const edgehal_buffer_desc *desc,
                                       void **buffer, char *err, size_t err_len) {
    (void)device;
    if (!desc || desc->kind != EDGEHAL_BUFFER_HOST_PTR || !desc->ptr) {
        set_err(err, err_len, "example plugin imports host pointers only");
        return EDGEHAL_ERR_UNSUPPORTED;
    }
    ex_buffer *b = calloc(1, sizeof *b);
    if (!b) return EDGEHAL_ERR_NOMEM;
    b->desc = *desc;
    *buffer = b;
    return EDGEHAL_OK;
}

static void ex_release_buffer(void *buffer) { free(buffer); }

static const edgehal_plugin_v1 TABLE = {
    .abi_version = EXAMPLE_ABI_VERSION,
    .struct_size = sizeof(edgehal_plugin_v1),
    .name = "example",
    .version = "0.1.0",
    .memory_domains = EDGEHAL_MEM_HOST | EDGEHAL_MEM_HOST_IMPORTED,
    .device_count = ex_device_count,
    .device_name = ex_device_name,
    .open = ex_open,
    .close = ex_close,
    .supports = ex_supports,
    .compile = ex_compile,
    .release_executable = ex_release_executable,
    .submit = ex_submit,
    .fence_wait = ex_fence_wait,
    .release_fence = ex_release_fence,
    .import_buffer = ex_import_buffer,
    .release_buffer = ex_release_buffer,
};

#ifndef EXAMPLE_OMIT_ENTRY
__attribute__((visibility("default"))) const edgehal_plugin_v1 *
edgehal_plugin_entry(uint32_t abi_version) {
#if EXAMPLE_ABI_VERSION == EDGEHAL_PLUGIN_ABI_VERSION
    if (abi_version != EDGEHAL_PLUGIN_ABI_VERSION) return NULL;
#else
    (void)abi_version; /* test build: answer with the wrong version */
#endif
    return &TABLE;
}
#else
/* Test build without the entry point: export the table under a name edgehal does not use. */
__attribute__((visibility("default"))) const edgehal_plugin_v1 *example_table(void) {
    return &TABLE;
}
#endif
