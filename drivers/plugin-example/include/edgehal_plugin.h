/*
 * edgehal vendor plugin ABI, version 1.
 *
 * A plugin is a shared object that exports one C function:
 *
 *     const edgehal_plugin_v1 *edgehal_plugin_entry(uint32_t abi_version);
 *
 * edgehal calls it with the ABI version it speaks (EDGEHAL_PLUGIN_ABI_VERSION). The plugin
 * returns a pointer to a static table of function pointers (valid until the library is
 * unloaded), or NULL when it cannot speak that version. edgehal refuses a table whose
 * abi_version differs from the one it asked for, whose struct_size is too small, or with a NULL
 * function pointer.
 *
 * The table mirrors edgehal's Rust Driver/Device traits:
 *   probe    -> device_count / device_name
 *   open     -> open / close
 *   supports -> supports (op type + input descriptors; no = 0 and a reason)
 *   compile  -> compile / release_executable (a program: ops over numbered values)
 *   submit   -> submit (input and output tensors as pointers + descriptors) returning a fence
 *   fence    -> fence_wait / release_fence
 *   buffers  -> import_buffer / release_buffer (host pointer, dma-buf fd, memfd)
 *
 * Rules:
 *   - Every function reports errors by status code and, where it has an (err, err_len) pair,
 *     a NUL-terminated message of at most err_len bytes. No function may longjmp or throw
 *     across this boundary. edgehal passes no callbacks into the plugin in v1.
 *   - Input tensor memory is valid for reads, and output tensor memory for writes, from the
 *     call to submit until fence_wait on its fence returned something other than
 *     EDGEHAL_ERR_TIMEOUT. The plugin must not touch it afterwards.
 *   - Strings returned by the plugin (name, device_name) are static.
 *   - Calls on one device handle are not made concurrently by edgehal.
 *   - Element types use ONNX TensorProto.DataType codes. Op types use ONNX spelling. v1 passes
 *     no attributes: edgehal only offers a plugin nodes without attributes.
 */
#ifndef EDGEHAL_PLUGIN_H
#define EDGEHAL_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGEHAL_PLUGIN_ABI_VERSION 1u
#define EDGEHAL_PLUGIN_ENTRY_SYMBOL "edgehal_plugin_entry"

typedef int32_t edgehal_status;
#define EDGEHAL_OK 0
#define EDGEHAL_ERR_UNSUPPORTED 1
#define EDGEHAL_ERR_INVALID 2
#define EDGEHAL_ERR_DEVICE 3
#define EDGEHAL_ERR_TIMEOUT 4
#define EDGEHAL_ERR_NOMEM 5

/* Element types (ONNX TensorProto.DataType). 0 = not known yet. */
#define EDGEHAL_DTYPE_UNKNOWN 0
#define EDGEHAL_DTYPE_FLOAT 1
#define EDGEHAL_DTYPE_UINT8 2
#define EDGEHAL_DTYPE_INT8 3
#define EDGEHAL_DTYPE_INT32 6
#define EDGEHAL_DTYPE_INT64 7
#define EDGEHAL_DTYPE_FLOAT16 10

/* Memory domains a device reaches directly (bit mask). */
#define EDGEHAL_MEM_HOST 1u
#define EDGEHAL_MEM_HOST_IMPORTED 2u
#define EDGEHAL_MEM_DMABUF 4u
#define EDGEHAL_MEM_DEVICE_LOCAL 8u

#define EDGEHAL_MAX_RANK 8u
/* rank value meaning "shape not known" (compile-time descriptors only). */
#define EDGEHAL_RANK_UNKNOWN 0xffffffffu
/* value index meaning "optional input omitted". */
#define EDGEHAL_NO_VALUE 0xffffffffu

typedef struct edgehal_tensor_desc {
    int32_t dtype;
    uint32_t rank;
    int64_t dims[EDGEHAL_MAX_RANK];
} edgehal_tensor_desc;

typedef struct edgehal_tensor {
    edgehal_tensor_desc desc;
    void *data;
    uint64_t bytes;
} edgehal_tensor;

typedef struct edgehal_op {
    const char *op_type;
    uint32_t n_inputs;
    const uint32_t *inputs; /* value indices, EDGEHAL_NO_VALUE for omitted */
    uint32_t n_outputs;
    const uint32_t *outputs;
} edgehal_op;

/* A subgraph: ops in topological order over values 0..n_values-1. Values are program inputs,
 * constants, or op outputs. Constant data is valid only during compile (copy what you keep). */
typedef struct edgehal_program {
    uint32_t n_values;
    const edgehal_tensor_desc *values;
    uint32_t n_ops;
    const edgehal_op *ops;
    uint32_t n_inputs;
    const uint32_t *inputs;
    uint32_t n_outputs;
    const uint32_t *outputs;
    uint32_t n_constants;
    const uint32_t *constant_values;
    const edgehal_tensor *constants;
} edgehal_program;

#define EDGEHAL_BUFFER_HOST_PTR 1
#define EDGEHAL_BUFFER_DMABUF_FD 2
#define EDGEHAL_BUFFER_MEMFD 3

typedef struct edgehal_buffer_desc {
    int32_t kind;
    int32_t fd;     /* DMABUF_FD, MEMFD: borrowed; dup it to keep it */
    void *ptr;      /* HOST_PTR */
    uint64_t offset;
    uint64_t bytes;
} edgehal_buffer_desc;

typedef struct edgehal_plugin_v1 {
    uint32_t abi_version; /* EDGEHAL_PLUGIN_ABI_VERSION */
    uint32_t struct_size; /* sizeof(edgehal_plugin_v1) */
    const char *name;     /* driver name, [a-z0-9_-]+ */
    const char *version;
    uint32_t memory_domains; /* EDGEHAL_MEM_* bits */

    uint32_t (*device_count)(void);
    const char *(*device_name)(uint32_t index);
    edgehal_status (*open)(uint32_t index, void **device, char *err, size_t err_len);
    void (*close)(void *device);

    /* 1: supported; 0: not, with a reason in (reason, reason_len). */
    int32_t (*supports)(void *device, const char *op_type, uint32_t n_inputs,
                        const edgehal_tensor_desc *inputs, char *reason, size_t reason_len);

    edgehal_status (*compile)(void *device, const edgehal_program *program, void **executable,
                              char *err, size_t err_len);
    void (*release_executable)(void *executable);

    edgehal_status (*submit)(void *device, void *executable, const edgehal_tensor *inputs,
                             uint32_t n_inputs, const edgehal_tensor *outputs, uint32_t n_outputs,
                             void **fence, char *err, size_t err_len);
    /* timeout_ns < 0: wait forever. Returns OK, ERR_TIMEOUT, or the execution's error. */
    edgehal_status (*fence_wait)(void *fence, int64_t timeout_ns, char *err, size_t err_len);
    void (*release_fence)(void *fence);

    edgehal_status (*import_buffer)(void *device, const edgehal_buffer_desc *desc, void **buffer,
                                    char *err, size_t err_len);
    void (*release_buffer)(void *buffer);
} edgehal_plugin_v1;

typedef const edgehal_plugin_v1 *(*edgehal_plugin_entry_fn)(uint32_t abi_version);

const edgehal_plugin_v1 *edgehal_plugin_entry(uint32_t abi_version);

#ifdef __cplusplus
}
#endif

#endif /* EDGEHAL_PLUGIN_H */
