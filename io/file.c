/* What every reader of a user's file shares: messages that always name the file. */
#include <stdio.h>
#include <string.h>

#include "io/io_internal.h"
#include "tensor/tensor_internal.h"

void qkv__name_file_in_error(const char *op, const char *path, bool had_error) {
    const char *e = qkv_error();
    if (had_error || !e || strstr(e, path)) return;
    /* The message is at most 1024 bytes: a copy on the stack, since memory may be short. */
    char copy[1024];
    snprintf(copy, sizeof copy, "%s", e);
    qkv_clear_error();
    qkv_set_error("%s: %s: %s", op, path, copy);
}
