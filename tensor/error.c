/* The per-thread error state: the first error since the last clear, with its message. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "tensor/tensor_internal.h"

static _Thread_local char message[1024];
static _Thread_local bool has_error;

const char *qkv_error(void) {
    return has_error ? message : NULL;
}

void qkv_clear_error(void) {
    has_error = false;
    message[0] = '\0';
}

void *qkv_set_error(const char *fmt, ...) {
    if (has_error) return NULL;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    has_error = true;
    return NULL;
}

bool qkv__null_object(const char *op, const char *what, const void *p) {
    if (p) return false;
    qkv_set_error("%s: %s is NULL", op, what); /* kept if first */
    return true;
}

bool qkv__null_args(const char *op, int n, const void *const *args) {
    for (int i = 0; i < n; i++)
        if (!args[i]) {
            qkv_set_error("%s: tensor argument %d is NULL", op, i + 1); /* kept if first */
            return true;
        }
    return false;
}

char *qkv_shape_str(const qkv_tensor *t, char *buf, size_t size) {
    size_t used = 0;
    if (size == 0) return buf;
    buf[0] = '\0';
    if (!t) {
        snprintf(buf, size, "(null)");
        return buf;
    }
    used += (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < t->ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ",%lld" : "%lld",
                                 (long long)t->shape[i]);
    if (used < size) snprintf(buf + used, size - used, "]");
    return buf;
}
